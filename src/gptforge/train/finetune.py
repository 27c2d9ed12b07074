"""Fine-tuning variants that plug into the Trainer: LoRA adapters on the model, and instruction tuning as a task.

LoRA is a change of the model (`adapters.apply_lora`): the base is frozen, only the adapters train, and the
task's `save` writes the adapter folder alone, for checkpoints, `best/` and the final run folder alike; the
optimizer state in a checkpoint covers the adapters only. Instruction tuning is a task: batches of whole
examples, padded on the right, with the loss on the answer tokens (`data.examples`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..adapters import apply_lora
from ..data.dataset import RunData
from ..data.examples import ExampleBatches, Examples, is_example_file, read_examples, truncation_note
from ..errors import DataError, OptionError
from ..options import InstructOptions, LoRAOptions, TrainConfig
from .tasks import Task

LORA_LEARNING_RATE = 2e-4  # the default step size of a LoRA run: adapters start at zero and need larger steps


def check_lora(lora: LoRAOptions | None, cfg: TrainConfig, init: str | None, examples: bool = False) -> None:
    """Refuse, before any work, what cannot go with LoRA or with instruction data."""
    if examples and init is None:
        raise OptionError("instruction data fine-tunes a pretrained model: give --init MODEL")
    if lora is None or not lora.enabled:
        return
    if init is None:
        raise OptionError("--lora-r trains an adapter on a pretrained model: give --init MODEL")
    if cfg.freeze:
        raise OptionError("--lora-r freezes the whole base model already; leave out --freeze")
    if cfg.fsdp:
        raise OptionError("--lora-r and --fsdp do not go together: the adapters are small, use data parallel (--nproc)")


def add_lora(
    model, lora: LoRAOptions | None, cfg: TrainConfig, init: str | None, log: Callable[[str], None] = print
) -> TrainConfig:
    """Give `model` the LoRA adapters `lora` asks for (nothing when it asks for none); the config with LoRA's
    default learning rate where none was given."""
    if lora is None or not lora.enabled:
        return cfg
    check_lora(lora, cfg, init)
    return start_lora(model, lora, cfg, init, log)


def start_lora(
    model, lora: LoRAOptions, cfg: TrainConfig, base: str | None, log: Callable[[str], None] = print
) -> TrainConfig:
    """apply_lora as `lora` says, seeded, logged; the config with LoRA's default learning rate where none was given."""
    torch.manual_seed(cfg.seed)  # the same starting adapter on every rank and every rerun
    layers = apply_lora(model, lora.lora_r, lora.lora_alpha, lora.lora_dropout, lora.targets, base=base)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(
        f"LoRA: rank {lora.lora_r}, alpha {lora.lora_alpha:g} on {len(layers)} layers ({', '.join(lora.targets)}): "
        f"{trainable:,} trainable parameters, {trainable / model.num_params():.2%} of the model; the base stays frozen"
    )
    if cfg.learning_rate is None:
        cfg = dataclasses.replace(cfg, learning_rate=LORA_LEARNING_RATE)
    return cfg


class InstructionTuning(Task):
    """Next-token loss on the answer tokens of whole examples; evaluated by the loss and perplexity of the
    validation answers. Batches are padded on the right, so causal attention never lets a real token see a pad
    and no attention mask needs to reach the model (the batch carries one for other uses)."""

    def __init__(self, train: Examples, val: Examples | None, pad_id: int, tokenizer_fingerprint: str = ""):
        self.train, self.val, self.pad_id = train, val, pad_id
        self.data = RunData(train, val, None, train.fingerprint, tokenizer_fingerprint)

    def make_batches(self, cfg, block_size: int, rank: int, world_size: int) -> ExampleBatches:
        return ExampleBatches(self.train, cfg.batch_size, self.pad_id, seed=cfg.seed, rank=rank, world_size=world_size)

    def tokens_per_batch(self, cfg, block_size: int) -> int:
        return max(1, round(cfg.batch_size * self.train.tokens / len(self.train)))

    def loss(self, model: torch.nn.Module, batch: tuple) -> torch.Tensor:
        x, y, _ = batch
        return model(x, y)[1]

    @property
    def has_validation(self) -> bool:
        return self.val is not None and len(self.val) > 0

    def evaluate(self, model: torch.nn.Module, *, full: bool, trainer) -> dict:
        nats, count = answer_loss(
            model,
            self.val,
            trainer.cfg.batch_size,
            self.pad_id,
            trainer.device,
            None if full else trainer.cfg.eval_tokens,
            trainer.dtype,
        )
        loss = nats / max(count, 1)
        return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0)), "val_tokens": count}

    def describe(self, row: dict) -> str:
        loss, perplexity, tokens = row["val_loss"], row["val_perplexity"], row["val_tokens"]
        return f"val loss {loss:.4f}, perplexity {perplexity:.2f} (on {tokens:,} answer tokens)"

    def size(self) -> str:
        return f"training examples: {len(self.train):,} ({self.train.tokens:,} tokens)"


@torch.no_grad()
def answer_loss(
    model,
    examples: Examples,
    batch_size: int,
    pad_id: int,
    device,
    max_tokens: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[float, int]:
    """Summed cross-entropy (nats) of the answer tokens of `examples` and their count (the first examples
    up to about `max_tokens` tokens when given); batches of similar lengths waste little on padding."""
    from ..data.examples import pad_examples

    order = sorted(range(len(examples)), key=lambda i: len(examples.ids[i]))
    if max_tokens:
        kept, total = [], 0
        for i in range(len(examples)):  # the first examples, not the shortest: a fair sample
            if total >= max_tokens:
                break
            kept.append(i)
            total += len(examples.ids[i])
        order = sorted(kept, key=lambda i: len(examples.ids[i]))
    was_training = model.training
    model.eval()
    nats, count = 0.0, 0
    for s in range(0, len(order), batch_size):
        rows = order[s : s + batch_size]
        x, y, _ = pad_examples([examples.ids[i] for i in rows], [examples.answer[i] for i in rows], pad_id)
        x, y = x.to(device), y.to(device)
        n = int((y != -100).sum())
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(x, y)[1]
        nats, count = nats + float(loss) * n, count + n
    model.train(was_training)
    return nats, count


def example_inputs(inputs, eval_inputs, data, instruct: InstructOptions | None, plain_only: Sequence[str] = ()) -> bool:
    """Whether a run trains on instruction examples: its inputs are all example files (JSON Lines with
    prompt/completion or messages). Mixed inputs, instruction options without examples and, with examples,
    the options of plain text given (`plain_only`: their flags) are refused."""
    files = [Path(str(i)) for i in inputs or [] if isinstance(i, (str, Path))]
    found = [is_example_file(f) for f in files]
    asked = instruct is not None and (instruct.chat_template or instruct.train_on_prompt)
    if not any(found):
        if asked:
            raise OptionError(
                "--chat-template and --train-on-prompt apply to instruction data: JSON Lines of "
                '{"prompt": ..., "completion": ...} or {"messages": [...]}'
            )
        return False
    if not all(found) or len(files) != len(inputs) or data is not None:
        plain = [str(f) for f, ok in zip(files, found) if not ok] or ["--data / --hf-dataset"]
        raise DataError(
            f"{plain[0]}: instruction examples (prompt/completion or messages) cannot be mixed with plain text"
        )
    bad = [str(e) for e in eval_inputs or [] if not is_example_file(e)]
    if bad:
        raise DataError(
            f"--val-file {bad[0]}: the training data are instruction examples; give examples to validate on too"
        )
    if plain_only:
        raise OptionError(
            f"{', '.join(plain_only)}: for plain text; instruction examples are read whole, one per row, "
            "so leave it out"
        )
    return True


def instruction_task(
    inputs,
    eval_inputs,
    tokenizer,
    block_size: int,
    cfg: TrainConfig,
    instruct: InstructOptions | None,
    log: Callable[[str], None] = print,
) -> InstructionTuning:
    """Read, check and tokenize instruction examples (everything before training starts); the chat template used
    (the --chat-template file, the tokenizer's, or gptforge's default) is stored in the tokenizer's config."""
    from ..chat import ChatTemplate, load_template_file, template_of

    instruct = instruct or InstructOptions()
    given = load_template_file(instruct.chat_template) if instruct.chat_template else None
    source = given or template_of(tokenizer)
    template = ChatTemplate(
        source, tokenizer, f"--chat-template {instruct.chat_template}" if given else "the chat template"
    )
    read = dict(
        tokenizer=tokenizer, max_tokens=block_size + 1, template=template, train_on_prompt=instruct.train_on_prompt
    )
    examples = read_examples(inputs, **read)
    train, val = (examples, read_examples(eval_inputs, **read)) if eval_inputs else examples.split(0.1, cfg.seed)
    tokenizer.meta["chat_template"] = source  # saved with the model: generate --chat and transformers use it
    note = truncation_note(examples, block_size)
    if note:
        log(note)
    what = "every token" if instruct.train_on_prompt else "the answers only"
    log(f"instruction data: {len(train):,} training and {len(val) if val else 0:,} validation examples; loss on {what}")
    task = InstructionTuning(train, val, tokenizer.pad_id, tokenizer.fingerprint)
    # what a resumed run must keep: the same records under another template or mask are other examples
    task.options = {
        "--chat-template": hashlib.sha256(source.encode()).hexdigest()[:12] if source else None,
        "--train-on-prompt": instruct.train_on_prompt,
    }
    return task


__all__ = [
    "InstructionTuning",
    "LORA_LEARNING_RATE",
    "add_lora",
    "answer_loss",
    "check_lora",
    "start_lora",
    "example_inputs",
    "instruction_task",
]
