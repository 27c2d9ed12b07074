"""From raw text (or a prepared dataset) to a trained model folder in one call, and the choice of model size."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import torch

from ..checkpoint import load_model, resolve_model_path
from ..config import GPTConfig, preset
from ..data.dataset import load_run_data
from ..errors import ConfigError, DataError, NotFoundError, OptionError, TokenizerError
from ..fsio import folder_of, write_text
from ..inference.quantize import refuse_quantized
from ..kernels import bf16_products, matmul
from ..model import GPT
from ..options import DEFAULT_VOCAB_SIZE, InstructOptions, LoRAOptions, PreferenceOptions, TrainConfig, unset_defaults
from ..runtime import cpu_bf16_products, pick_precision, resolve_device, world_size
from . import state
from .callbacks import Callbacks
from .finetune import add_lora, check_lora, example_inputs, instruction_task
from .logging import check_reporters
from .loop import Trainer, TrainResult
from .optim import configure_optimizer, freeze_parts
from .preference import preference_inputs, preference_task
from .runfolder import (
    check_block_size,
    check_fits_memory,
    claim_run_folder,
    refuse_conflicts,
    refuse_previous_run,
    resume_after_restart,
    resume_tokenizer,
)


def build_model(init: str | None = None, size: str | GPTConfig = "mini", **overrides) -> tuple[GPT, bool]:
    """The model to train and whether it is a fine-tune: pretrained weights from `init` (a model folder,
    weights file or hub id), or fresh GPT-2 weights for `size` (a preset name or a GPTConfig) with
    config fields overridden."""
    if init is not None:
        return load_model(init), True
    overrides = {k: v for k, v in overrides.items() if v is not None}
    config = dataclasses.replace(size, **overrides) if isinstance(size, GPTConfig) else preset(size, **overrides)
    return GPT(config), False


@torch.no_grad()
def zero_output_projections(model: GPT) -> None:
    """Each block's attention and MLP output projections start at zero: every block begins as the identity
    and the residual stream as the embeddings, and the first steps shape the blocks' outputs rather than undo
    random ones (as the fast small-GPT training recipes do)."""
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            p.zero_()


def train(
    model: GPT,
    data,
    config: TrainConfig | None = None,
    *,
    tokenizer=None,
    finetune: bool = False,
    on_step: Callable[[Trainer], None] | None = None,
    **options,
) -> TrainResult:
    """Train `model` on `data` (a prepared dataset folder or TokenDataset). Options are TrainConfig fields and
    the callbacks of train/callbacks.py (on_step, on_log, on_evaluate, on_save)."""
    callbacks = Callbacks.take(options)
    callbacks.on_step = callbacks.on_step or on_step
    cfg = resume_after_restart(dataclasses.replace(config, **options) if config else TrainConfig(**options))
    if tokenizer is None:
        tokenizer = getattr(data, "tokenizer", None)
    refuse_previous_run(Path(cfg.out_dir), cfg)
    with claim_run_folder(Path(cfg.out_dir)):
        trainer = Trainer(model, load_run_data(data), cfg, tokenizer=tokenizer, finetune=finetune, callbacks=callbacks)
        return trainer.run()


# --- model size -----------------------------------------------------------------------------------------


def best_seconds(step: Callable[[], object], device: torch.device, repeats: int) -> float:
    """The shortest of `repeats` timed calls of `step` on `device`, after one untimed warm-up call."""
    times = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times[1:])


def matmul_flops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 5) -> float:
    """The best FLOP/s of `repeats` n x n matrix products on `device`, by the kernel the model's layers use
    (`kernels.matmul`: oneDNN on x86 CPUs): what the hardware gives right now."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / best_seconds(lambda: matmul(a, b), device, repeats)


def training_rate(config: GPTConfig, block: int, cfg: TrainConfig, repeats: int = 2) -> float:
    """Training tokens per second of a fresh model of `config` on the run's device, precision and batch
    shape, measured: the best of `repeats` steps (forward, backward and the from-scratch run's optimizer,
    whose Muon orthogonalisation is a tenth or more of a small model's step) after a warm-up. What a size would
    really train at on this machine, now."""
    device = resolve_device(cfg.device)
    dtype = pick_precision(cfg.precision, device)
    model = GPT(config).to(device).train()
    optimizer = configure_optimizer(model, dataclasses.replace(cfg, **unset_defaults(cfg, finetune=False)), device)
    x = torch.randint(0, config.vocab_size, (cfg.batch_size, block + 1), device=device)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with bf16_products(cpu_bf16_products(cfg.precision, device)):  # the products the run will take
        return cfg.batch_size * block / best_seconds(step, device, repeats)


SCRATCH_SIZES = ("tiny", "mini", "small", "gpt2")  # the presets `choose_size` picks from, smallest first
TOKENS_PER_PARAM = 2.0  # a size is picked only if the run shows it at least this many tokens per parameter
MAX_EPOCHS_COUNTED = 10  # passes over the data beyond this many teach a model little more


def choose_size(
    train_tokens: int,
    cfg: TrainConfig,
    vocab_size: int,
    *,
    flops_per_s: float | None = None,
    rate: Callable[[GPTConfig, int], float] | None = None,
) -> tuple[str, str]:
    """The preset for a from-scratch run where the user named none, and the reason, in words.

    The largest of SCRATCH_SIZES that the run can feed: one that will see at least TOKENS_PER_PARAM
    training tokens per parameter, repeats of the data beyond MAX_EPOCHS_COUNTED passes not counted.
    What a run will see follows from --max-steps or --epochs; for --max-time it is measured: a size that
    could not see enough even at the device's full matrix-product rate (`flops_per_s`, measured when not
    given) is ruled out at once, and the others train a few steps on the run's device and batch shape
    (`rate(config, block)` gives tokens per second; `training_rate` when not given), so the estimate holds
    on any machine without a constant measured on one. A short CPU budget thus gets a small model that
    takes many steps rather than a big one that takes few (docs/training.md).
    """
    world = world_size()
    if cfg.max_time is not None and flops_per_s is None:
        device = resolve_device(cfg.device)
        with bf16_products(cpu_bf16_products(cfg.precision, device)):
            flops_per_s = matmul_flops(device, pick_precision(cfg.precision, device)) * world
    rate = rate or (lambda config, block: training_rate(config, block, cfg))
    chosen, why = SCRATCH_SIZES[0], ""
    for name in SCRATCH_SIZES:
        config = preset(name, vocab_size=vocab_size)
        block = min(cfg.block_size or config.n_positions, config.n_positions)
        cap = MAX_EPOCHS_COUNTED * train_tokens
        if cfg.max_time is not None:
            at_most = min(cfg.max_time * flops_per_s / config.flops_per_token(block), cap) / config.num_params()
            if name != SCRATCH_SIZES[0] and at_most < TOKENS_PER_PARAM:
                return chosen, f"{why}; {name!r} would see at most {at_most:.2g} per parameter"
            tokens, how = cfg.max_time * rate(config, block) * world, "in the time (measured rate)"
        elif cfg.max_steps is not None:
            tokens, how = cfg.max_steps * cfg.batch_size * cfg.grad_accum * world * block, "in the steps"
        else:
            tokens, how = (cfg.epochs or 1.0) * train_tokens, "in the epochs"
        seen = min(tokens, cap)
        per_param = seen / config.num_params()
        line = f"about {seen / 1e6:,.1f}M tokens {how}, {per_param:.2g} per parameter"
        if name != SCRATCH_SIZES[0] and per_param < TOKENS_PER_PARAM:
            return chosen, f"{why}; {name!r} would see only {per_param:.2g} per parameter"
        chosen, why = name, line
    return chosen, why


# --- text to model --------------------------------------------------------------------------------------


def load_model_folder(name_or_path: str) -> Path:
    """The local folder of a model (downloaded first when it is a hub id)."""
    return folder_of(resolve_model_path(name_or_path))


def _run_tokenizer(
    inputs, out: Path, init, tokenizer, data, vocab_size, kind, names: str, log, progress: bool, read: dict
):
    """The tokenizer of a run: the model's (fine-tuning), the one named, the dataset's, or one trained on the inputs."""
    from ..data.vocabulary import train_tokenizer
    from ..tokenizer import load_tokenizer

    if init is not None:
        try:
            tok = load_tokenizer(tokenizer or load_model_folder(init))
        except (FileNotFoundError, ValueError) as e:
            raise TokenizerError(f"{init}: no usable tokenizer in the model folder ({e}); pass --tokenizer") from None
        log(f"fine-tuning {init} with its own tokenizer ({tok.vocab_size:,} tokens)")
    elif tokenizer is not None:
        tok = load_tokenizer(tokenizer)
        log(f"tokenizer: {tokenizer} ({tok.vocab_size:,} tokens)")
    elif data is not None:
        tok = load_tokenizer(Path(data) / "tokenizer")
        log(f"tokenizer: the one the dataset {data} was prepared with ({tok.vocab_size:,} tokens)")
    else:
        tok_dir = out / "tokenizer"
        log(f"training a {kind} tokenizer on {names} -> {tok_dir}")
        tok = train_tokenizer(
            inputs,
            vocab_size=vocab_size or DEFAULT_VOCAB_SIZE,
            kind=kind,
            out_dir=tok_dir,
            progress=progress,
            exclude=[out],
            **read,
        )
        log(f"tokenizer: {tok.vocab_size:,} tokens")
    return tok


def _check_before_work(
    cfg: TrainConfig, inputs, data, eval_inputs, init, size, overrides, tokenizer, vocab_size, line_by_line
) -> None:
    """Everything that can be refused now rather than after minutes of tokenizer training and preparation."""
    if not inputs and not data:
        raise DataError("nothing to train on: give text files or folders, or --data with a prepared dataset")
    refuse_conflicts(inputs, data, eval_inputs, init, size, overrides, tokenizer, vocab_size, line_by_line)
    refuse_previous_run(Path(cfg.out_dir), cfg, init)
    _check_model_fits(cfg, init, size, overrides, vocab_size)


def _refuse_missing(inputs, eval_inputs) -> None:
    """A mistyped input name, before a tokenizer is trained on the rest (the options are checked first)."""
    for item in [*(inputs or []), *(eval_inputs or [])]:
        if isinstance(item, (str, Path)) and not any(c in str(item) for c in "*?[") and not Path(item).exists():
            raise NotFoundError(f"{item}: no such file or folder")


def _check_model_fits(cfg: TrainConfig, init, size, overrides: dict | None, vocab_size) -> None:
    """What can be checked of the model before any tokenizer or data work: its config, the context, the memory
    (for a size still to be chosen, the smallest one: a lower bound)."""
    device = resolve_device(cfg.device)
    if init is not None:
        config = GPTConfig.load(load_model_folder(init))
        refuse_quantized(config, f"--init {init}", "be trained")
    else:
        over = {k: v for k, v in (overrides or {}).items() if v is not None}
        if cfg.block_size:
            over.setdefault("n_positions", cfg.block_size)
        try:
            config = preset(size or SCRATCH_SIZES[0], **{"vocab_size": vocab_size or DEFAULT_VOCAB_SIZE, **over})
        except ConfigError:
            if size is not None:
                raise
            return  # the overrides may fit the size chosen later; it is checked then
    block = cfg.block_size or config.n_positions
    check_block_size(block, config)
    if cfg.freeze and (init is not None or size or (overrides or {}).get("n_layer")):  # else the size is chosen later
        freeze_parts(cfg.freeze, config.n_layer)
    check_fits_memory(config, cfg, block, device)


@contextlib.contextmanager
def _restart_hint(out: Path, log: Callable[[str], None]):
    """A run stopped by Ctrl-C before its first checkpoint says how to start again."""
    try:
        yield
    except KeyboardInterrupt:
        if not state.list_checkpoints(out):
            again = " with --overwrite" if (out / "metrics.jsonl").exists() else ""
            log(
                f"interrupted before the first checkpoint, so there is nothing to resume: run the same command "
                f"again{again}"
            )
        raise


def _write_run_config(out: Path, given: dict, trainer: Trainer, size: str | None, tok, lora) -> None:
    """run_config.json: the options as given (usable as `--config`) and as resolved."""
    resolved = {
        "train": dataclasses.asdict(trainer.cfg),
        "model": trainer.model.config.to_dict(),
        "size": size,
        "lora": dataclasses.asdict(lora) if lora and lora.enabled else None,
        "tokenizer": {"kind": tok.kind, "vocab_size": tok.vocab_size, "source": tok.source},
    }
    write_text(
        out / "run_config.json", json.dumps({"options": given, "resolved": resolved}, indent=2, default=str) + "\n"
    )


def _fresh_model(train_tokens: int, cfg: TrainConfig, tok, size, model_overrides, log):
    """A model from scratch for the tokenizer: the size given, or one chosen for the data; seeded by cfg.seed."""
    overrides = dict(model_overrides or {})
    overrides.setdefault("vocab_size", tok.vocab_size)
    overrides.setdefault("bos_token_id", tok.eos_id)
    overrides.setdefault("eos_token_id", tok.eos_id)
    if cfg.block_size:
        overrides.setdefault("n_positions", cfg.block_size)
    if size is None:
        size, why = choose_size(train_tokens, cfg, overrides["vocab_size"])
        given = all(k in overrides for k in ("n_layer", "n_embd", "n_head", "n_positions"))
        log(
            f"model size: as given (n_layer, n_embd, n_head, n_positions); dropout and the rest from {size!r}"
            if given
            else f"model size: {size!r}: {why} (choose another with --size)"
        )
    torch.manual_seed(cfg.seed)  # the same fresh weights on every rank and every rerun
    model, _ = build_model(size=size, **overrides)
    if unset_defaults(cfg, finetune=False).get("zero_init", cfg.zero_init):  # the default, or as given
        zero_output_projections(model)
    return model, size


def _task(pairs, examples, inputs, eval_inputs, tok, model, cfg, preference, instruct, lora, log):
    """The task of inputs that are not plain text: preference pairs or instruction examples; None for text."""
    if pairs:
        lora_on = lora is not None and lora.enabled
        return preference_task(inputs, eval_inputs, tok, model, cfg, preference, instruct, lora_on, log)
    if examples:
        return instruction_task(
            inputs, eval_inputs, tok, cfg.block_size or model.config.n_positions, cfg, instruct, log
        )
    return None


def _names(inputs) -> str:
    """The inputs as the log names them: up to three by name, more by count."""
    return ", ".join(map(str, inputs or [])) if len(inputs or []) <= 3 else f"{len(inputs)} inputs ({inputs[0]}, ...)"


def _with_a_length(cfg: TrainConfig, log) -> TrainConfig:
    """One epoch where the user gave no --max-steps, --epochs or --max-time."""
    if cfg.max_steps is None and cfg.epochs is None and cfg.max_time is None:
        log("length: 1 epoch (set --max-steps, --epochs or --max-time)")
        return dataclasses.replace(cfg, epochs=1.0)
    return cfg


def run_training(
    inputs: list[str] | None = None,
    *,
    data: str | None = None,
    eval_inputs: list[str] | None = None,
    init: str | None = None,
    size: str | None = None,
    tokenizer: str | None = None,
    vocab_size: int | None = None,
    tokenizer_kind: str = "bpe",
    line_by_line: bool = False,
    model_overrides: dict | None = None,
    read_options: dict | None = None,
    log: Callable[[str], None] = print,
    record: dict | None = None,
    lora: LoRAOptions | None = None,
    instruct: InstructOptions | None = None,
    preference: PreferenceOptions | None = None,
    **options,
) -> TrainResult:
    """From raw text (or a prepared dataset) to a trained model folder, choosing what the user did not say.

    Fine-tuning (`init` names a pretrained model) uses that model's tokenizer; training from scratch
    trains a tokenizer on the inputs (or uses `tokenizer`), prepares the data under `out_dir/data`, and
    picks a model size for the data unless `size` is given. Every choice is printed. `read_options` are
    `data.reading.ReadOptions` fields for reading the inputs. The run folder gets `run_config.json`: the
    options as given (`record`, e.g. the command's; by default this call's) and as resolved. `lora` trains a
    LoRA adapter instead of the whole model; inputs that are instruction examples (JSON Lines of prompt/completion
    or messages) train on their answers, read as `instruct` says (train/finetune.py); `preference` trains on
    preference pairs (DPO or ORPO, train/preference.py).
    """
    from ..data.shards import prepare

    cfg = resume_after_restart(TrainConfig(**options))  # workers torchrun started again continue the run
    out = Path(cfg.out_dir)
    _check_before_work(cfg, inputs, data, eval_inputs, init, size, model_overrides, tokenizer, vocab_size, line_by_line)
    check_reporters(cfg.reporters)  # likewise a logger that is not installed
    plain_only = {"--line-by-line": line_by_line, "--batch-mode sequential": cfg.batch_mode == "sequential"}
    examples = example_inputs(inputs, eval_inputs, data, instruct, [flag for flag, on in plain_only.items() if on])
    pairs = preference_inputs(inputs, eval_inputs, preference)
    if pairs and init is None:
        raise OptionError("--preference tunes a trained model: give --init MODEL (e.g. an instruction-tuned one)")
    check_lora(lora, cfg, init, examples)
    _refuse_missing(inputs, eval_inputs)
    given = record if record is not None else dict(
        inputs=inputs, data=data, eval_inputs=eval_inputs, init=init, size=size, tokenizer=tokenizer,
        vocab_size=vocab_size, tokenizer_kind=tokenizer_kind, line_by_line=line_by_line,
        **(model_overrides or {}), **(read_options or {}), **options,
    )  # fmt: skip
    read = dict(read_options or {})
    main = world_size() == 1 or int(__import__("os").environ.get("RANK", "0")) == 0
    log = log if main else (lambda message: None)  # only rank 0 talks
    with claim_run_folder(out, log), _restart_hint(out, log):
        names = _names(inputs)
        torch.manual_seed(cfg.seed)  # before any random draw; fresh weights are seeded again after the size is measured
        model = build_model(str(load_model_folder(init)))[0] if init is not None else None
        if cfg.resume and init is None and tokenizer is None and data is None:
            tokenizer = resume_tokenizer(out)  # the run's own: never train a new one over it
        tok = _run_tokenizer(
            inputs, out, init, tokenizer, data, vocab_size, tokenizer_kind, names, log, cfg.progress and main, read
        )
        task = _task(pairs, examples, inputs, eval_inputs, tok, model, cfg, preference, instruct, lora, log)
        if data is None and task is None:
            data = out / "data"
            log(f"preparing {names} -> {data}")
            meta = prepare(
                inputs, tok, data, line_by_line=line_by_line, val_inputs=eval_inputs, seed=cfg.seed,
                progress=cfg.progress and main, expect_same=cfg.resume, exclude=[out], **read,
            )  # fmt: skip
            log(f"data: {meta['train']['tokens']:,} training tokens, {meta['val']['tokens']:,} validation tokens")
        run_data = task.data if task is not None else load_run_data(data)
        if model is None:
            model, size = _fresh_model(len(run_data.train), cfg, tok, size, model_overrides, log)
        cfg = add_lora(model, lora, _with_a_length(cfg, log), init, log)
        trainer = Trainer(model, run_data, cfg, tokenizer=tok, finetune=init is not None, task=task)
        if main:
            _write_run_config(out, given, trainer, size, tok, lora)
        return trainer.run()


__all__ = [
    "MAX_EPOCHS_COUNTED",
    "SCRATCH_SIZES",
    "TOKENS_PER_PARAM",
    "build_model",
    "choose_size",
    "load_model_folder",
    "matmul_flops",
    "run_training",
    "train",
    "training_rate",
    "zero_output_projections",
]
