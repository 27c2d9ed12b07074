"""Instruction and chat examples: JSON Lines of {"prompt", "completion"} or {"messages": [...]}, tokenized whole,
with a mask of the answer tokens, and padded batches of whole examples.

A prompt/completion pair is the prompt's tokens, then the completion's and the end-of-text token; a conversation
is rendered by a chat template (`chat.ChatTemplate`, as transformers' `apply_chat_template` renders it) and
tokenized whole, its answer tokens being those that start inside an assistant message's text. Labels are -100
everywhere but on the answers (`train_on_prompt` labels every token), so the loss is the answers' alone. An
example longer than the context is cut at the end, never split into two, and counted; one with no answer token
left is dropped.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import DataError, NotFoundError

IGNORE = -100  # the label of a token the loss leaves out (transformers' and torch's convention)
EXAMPLE_SUFFIXES = (".jsonl", ".ndjson", ".json")


def json_records(path: Path) -> Iterator[tuple[str, object]]:
    """(file:line, value) of a JSON Lines file, or of a JSON array file."""
    if not path.is_file():
        raise NotFoundError(f"{path}: no such file")
    if path.suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: a .json file of examples must hold a list of objects")
        yield from ((f"{path}[{i}]", row) for i, row in enumerate(rows))
        return
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield f"{path}:{n}", json.loads(line)
                except ValueError as e:
                    raise DataError(f"{path}:{n}: not valid JSON ({e}); each line must be one example object") from None


def is_example_file(path) -> bool:
    """A .jsonl/.json file whose first record is an instruction example (has `messages`, or `prompt` and
    `completion`)."""
    path = Path(path)
    if path.suffix not in EXAMPLE_SUFFIXES or not path.is_file():
        return False
    try:
        _, first = next(json_records(path))
    except (StopIteration, DataError, UnicodeDecodeError, OSError):
        return False
    return isinstance(first, dict) and ("messages" in first or ("prompt" in first and "completion" in first))


@dataclass
class Examples:
    """Tokenized examples: each a token array and a boolean mask of the tokens the loss is on."""

    ids: list[np.ndarray] = field(default_factory=list)
    answer: list[np.ndarray] = field(default_factory=list)
    truncated: int = 0
    dropped: int = 0
    fingerprint: str = ""

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def tokens(self) -> int:
        return int(sum(len(i) for i in self.ids))

    def subset(self, index: Sequence[int]) -> "Examples":
        return Examples([self.ids[i] for i in index], [self.answer[i] for i in index], fingerprint=self.fingerprint)

    def split(self, val_fraction: float, seed: int) -> tuple["Examples", "Examples | None"]:
        """A seeded split into training and validation examples (none for validation below 2 examples)."""
        n = len(self)
        k = min(n - 1, max(1, round(n * val_fraction))) if n >= 2 and val_fraction > 0 else 0
        order = np.random.default_rng(seed).permutation(n)
        train, val = self.subset(sorted(order[k:])), (self.subset(sorted(order[:k])) if k else None)
        train.truncated, train.dropped = self.truncated, self.dropped
        return train, val


def encode_example(record, tokenizer, template, train_on_prompt: bool, where: str) -> tuple[list[int], list[bool]]:
    """Token ids and answer mask of one prompt/completion or messages record."""
    from ..chat import check_messages

    if not isinstance(record, dict):
        raise DataError(f"{where}: an example must be an object with 'prompt' and 'completion', or 'messages'")
    if "messages" in record:
        messages = check_messages(record["messages"], where)
        text, spans = (
            (template.render(messages, where=where), []) if train_on_prompt else template.answer_spans(messages, where)
        )
        enc = tokenizer.hf_tokenizer.encode(text, add_special_tokens=False)
        answer = [train_on_prompt or any(a <= start < b for a, b in spans) for start, _ in enc.offsets]
        return list(enc.ids), answer
    for name in ("prompt", "completion"):
        if name not in record:
            raise DataError(
                f"{where}: missing field {name!r} (an example has 'prompt' and 'completion', or 'messages')"
            )
        if not isinstance(record[name], str):
            raise DataError(f"{where}: field {name!r} must be a string")
    prompt, completion = tokenizer.encode(record["prompt"]), tokenizer.encode(record["completion"]) + [tokenizer.eos_id]
    return prompt + completion, [train_on_prompt] * len(prompt) + [True] * len(completion)


def read_examples(
    files: Sequence, tokenizer, max_tokens: int, template=None, train_on_prompt: bool = False
) -> Examples:
    """Every example of `files`, each cut to `max_tokens` tokens (the context plus the one predicted last)."""
    out, h = Examples(), hashlib.sha256()
    for path in map(Path, files):
        before = len(out.ids) + out.dropped
        for where, record in json_records(path):
            ids, answer = encode_example(record, tokenizer, template, train_on_prompt, where)
            if not any(answer[1:]):  # before any cut: an example with nothing to learn, not one cut too short
                raise DataError(
                    f"{where}: no answer to train on (no assistant message after the prompt); give each "
                    "example an assistant turn, or remove it"
                )
            h.update(json.dumps(record, sort_keys=True).encode())
            if len(ids) > max_tokens:
                ids, answer = ids[:max_tokens], answer[:max_tokens]
                out.truncated += 1
            if not any(answer[1:]):  # the first token is never predicted
                out.dropped += 1
                continue
            out.ids.append(np.asarray(ids, dtype=np.int64))
            out.answer.append(np.asarray(answer, dtype=bool))
        if len(out.ids) + out.dropped == before:
            raise DataError(f"{path}: holds no examples")
    if not out.ids:
        raise DataError(
            f"{', '.join(map(str, files))}: every example lost its answer when cut to the context of "
            f"{max_tokens - 1} tokens; raise --block-size or shorten the prompts"
        )
    out.fingerprint = h.hexdigest()[:20]
    return out


def truncation_note(examples: Examples, context: int) -> str | None:
    """The warning for examples cut to the context, or None."""
    if not (examples.truncated or examples.dropped):
        return None
    return (
        f"warning: {examples.truncated} example(s) were longer than the context of {context} tokens and were cut at "
        f"the end; {examples.dropped} of them were dropped (no answer token left)"
    )


def pad_examples(ids: Sequence[np.ndarray], answer: Sequence[np.ndarray], pad_id: int):
    """(input_ids, labels, attention_mask) for whole examples padded on the right: input_ids are each example
    without its last token, labels the next token where it is an answer token and -100 elsewhere."""
    import torch

    width = max(len(i) for i in ids) - 1
    x = np.full((len(ids), width), pad_id, dtype=np.int64)
    y = np.full((len(ids), width), IGNORE, dtype=np.int64)
    mask = np.zeros((len(ids), width), dtype=np.int64)
    for row, (tokens, ans) in enumerate(zip(ids, answer)):
        n = len(tokens) - 1
        x[row, :n], mask[row, :n] = tokens[:-1], 1
        y[row, :n] = np.where(ans[1:], tokens[1:], IGNORE)
    return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(mask)


class ExampleBatches:
    """Batches of whole examples, `batch(step)` a pure function of (seed, step, rank, world_size): epochs over the
    examples in a seeded order, a global batch of batch_size * world_size examples cut into one slice per rank."""

    def __init__(
        self, examples: Examples, batch_size: int, pad_id: int, *, seed: int = 0, rank: int = 0, world_size: int = 1
    ):
        self.examples, self.batch_size, self.pad_id = examples, batch_size, pad_id
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.steps_per_epoch = max(1, len(examples) // (batch_size * world_size))
        self.tokens_per_example = examples.tokens / max(1, len(examples))

    def indices(self, step: int) -> np.ndarray:
        epoch, i = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
        size = self.batch_size * self.world_size
        order = np.resize(order, max(size, len(order)))  # fewer examples than a batch: repeat them
        first = i * size + self.rank * self.batch_size
        return order[first : first + self.batch_size]

    def batch(self, step: int):
        index = self.indices(step)
        return pad_examples(
            [self.examples.ids[i] for i in index], [self.examples.answer[i] for i in index], self.pad_id
        )

    def epoch(self, step: int) -> float:
        return step / self.steps_per_epoch


__all__ = [
    "ExampleBatches",
    "Examples",
    "IGNORE",
    "encode_example",
    "is_example_file",
    "json_records",
    "pad_examples",
    "read_examples",
    "truncation_note",
]
