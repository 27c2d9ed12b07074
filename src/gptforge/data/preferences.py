"""Preference pairs: JSON Lines of {"prompt", "chosen", "rejected"}, tokenized as trl's DPOTrainer tokenizes them,
and padded batches of pairs.

Plain text: the prompt, and the prompt followed by each answer and the end-of-text token, are tokenized; the answer
starts where the prompt's tokens and the whole sequence's part (as in trl, tokens that merge across the boundary go
to the answer). Conversations: `chosen` and `rejected` are message lists (the assistant's answer, or whole
conversations sharing their first turns, whose shared part is the prompt) and `prompt` a message list or a string
(one user turn); each is rendered by the chat template (`chat.ChatTemplate`), the prompt with the generation prompt.
A pair is a chosen and a rejected token sequence with the length of their shared prompt; the loss reads the answer
tokens only. Rows that cannot be learnt from (a field missing, identical answers, a prompt that fills the context)
are refused with their file and line; answers longer than the context are cut at the end and counted.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DataError
from .examples import EXAMPLE_SUFFIXES, ExampleBatches, json_records, pad_examples

FIELDS = ("prompt", "chosen", "rejected")


def is_preference_file(path) -> bool:
    """A .jsonl/.json file whose first record has `chosen` and `rejected` (a preference pair)."""
    path = Path(path)
    if path.suffix not in EXAMPLE_SUFFIXES or not path.is_file():
        return False
    try:
        _, first = next(json_records(path))
    except (StopIteration, DataError, UnicodeDecodeError, OSError):
        return False
    return isinstance(first, dict) and "chosen" in first and "rejected" in first


@dataclass
class Pairs:
    """Tokenized pairs: the chosen and rejected sequences (prompt, then answer) and where their answers start."""

    chosen: list[np.ndarray] = field(default_factory=list)
    rejected: list[np.ndarray] = field(default_factory=list)
    prompt: list[int] = field(default_factory=list)
    truncated: int = 0
    fingerprint: str = ""

    def __len__(self) -> int:
        return len(self.chosen)

    @property
    def tokens(self) -> int:
        return int(sum(len(c) + len(r) for c, r in zip(self.chosen, self.rejected)))

    def subset(self, index: Sequence[int]) -> "Pairs":
        pick = lambda xs: [xs[i] for i in index]  # noqa: E731
        return Pairs(pick(self.chosen), pick(self.rejected), pick(self.prompt), fingerprint=self.fingerprint)

    def split(self, val_fraction: float, seed: int) -> tuple["Pairs", "Pairs | None"]:
        """A seeded split into training and validation pairs (none for validation below 2 pairs)."""
        n = len(self)
        k = min(n - 1, max(1, round(n * val_fraction))) if n >= 2 and val_fraction > 0 else 0
        order = np.random.default_rng(seed).permutation(n)
        train, val = self.subset(sorted(order[k:])), (self.subset(sorted(order[:k])) if k else None)
        train.truncated = self.truncated
        return train, val

    def sequences(self, index: Sequence[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The chosen sequences of `index`, then their rejected ones, and the answer mask of each."""
        seqs = [self.chosen[i] for i in index] + [self.rejected[i] for i in index]
        starts = [self.prompt[i] for i in index] * 2
        return seqs, [np.arange(len(s)) >= p for s, p in zip(seqs, starts)]

    def batch(self, index: Sequence[int], pad_id: int):
        """(input_ids, labels, pair index): 2 x len(index) rows, the chosen sequences first, right-padded; labels
        are the next token on answer tokens and -100 elsewhere (data.examples.pad_examples)."""
        import torch

        x, y, _ = pad_examples(*self.sequences(index), pad_id)
        return x, y, torch.as_tensor(np.asarray(index, dtype=np.int64))


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _text_pair(record: dict, tokenizer, where: str) -> tuple[list[int], list[int], list[int]]:
    for name in FIELDS:
        if not isinstance(record.get(name), str):
            raise DataError(
                f"{where}: field {name!r} must be a string (plain-text pairs have 'prompt', 'chosen' and 'rejected')"
                if name in record
                else f"{where}: missing field {name!r} (a preference pair has 'prompt', 'chosen' and 'rejected')"
            )
    eos = [tokenizer.eos_id]
    prompt = tokenizer.encode(record["prompt"])
    return (
        prompt,
        tokenizer.encode(record["prompt"] + record["chosen"]) + eos,
        (tokenizer.encode(record["prompt"] + record["rejected"]) + eos),
    )


def _message_pair(record: dict, tokenizer, template, where: str) -> tuple[list[int], list[int], list[int]]:
    from ..chat import check_messages

    chosen = check_messages(record["chosen"], f"{where}: 'chosen'")
    if not isinstance(record["rejected"], list):
        raise DataError(f"{where}: 'rejected' must be a message list like 'chosen'")
    rejected = check_messages(record["rejected"], f"{where}: 'rejected'")
    prompt = record.get("prompt")
    if prompt is None:  # whole conversations: their shared first turns are the prompt
        k = common_prefix([json.dumps(m) for m in chosen], [json.dumps(m) for m in rejected])
        prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
        if not prompt:
            raise DataError(f"{where}: 'chosen' and 'rejected' share no first turn; give the prompt as 'prompt'")
    elif isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    else:
        prompt = check_messages(prompt, f"{where}: 'prompt'")
    if not chosen or not rejected:
        raise DataError(f"{where}: one answer is all prompt; each of 'chosen' and 'rejected' needs its own turn")
    encode = lambda text: list(tokenizer.hf_tokenizer.encode(text, add_special_tokens=False).ids)  # noqa: E731
    return (
        encode(template.render(prompt, add_generation_prompt=True, where=where)),
        encode(template.render(prompt + chosen, where=where)),
        encode(template.render(prompt + rejected, where=where)),
    )


def encode_pair(record, tokenizer, template, where: str) -> tuple[list[int], list[int], int]:
    """The chosen and rejected token sequences of one record and the length of their shared prompt."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a preference pair must be an object with 'prompt', 'chosen' and 'rejected'")
    for name in ("chosen", "rejected"):
        if name not in record:
            raise DataError(
                f"{where}: missing field {name!r} (a preference pair has 'prompt', 'chosen' and 'rejected')"
            )
    if record["chosen"] == record["rejected"]:
        raise DataError(f"{where}: 'chosen' and 'rejected' are the same answer; a pair needs two different ones")
    if isinstance(record["chosen"], list):
        if template is None:
            raise DataError(f"{where}: message-list answers need a chat template")
        prompt, chosen, rejected = _message_pair(record, tokenizer, template, where)
    else:
        prompt, chosen, rejected = _text_pair(record, tokenizer, where)
    start = min(common_prefix(prompt, chosen), common_prefix(prompt, rejected))
    if chosen == rejected:
        raise DataError(f"{where}: 'chosen' and 'rejected' give the same tokens; a pair needs two different answers")
    return chosen, rejected, start


def read_pairs(files: Sequence, tokenizer, max_tokens: int, template=None) -> Pairs:
    """Every pair of `files`, each sequence cut to `max_tokens` tokens (the context plus the one predicted last); a
    prompt that leaves no answer token inside them is an error naming its file and line."""
    out, h = Pairs(), hashlib.sha256()
    for path in map(Path, files):
        before = len(out)
        for where, record in json_records(path):
            chosen, rejected, start = encode_pair(record, tokenizer, template, where)
            if start >= max_tokens:
                raise DataError(
                    f"{where}: the prompt takes {start} tokens and leaves no room for an answer in the context of "
                    f"{max_tokens - 1} tokens; shorten it or raise --block-size"
                )
            if len(chosen) > max_tokens or len(rejected) > max_tokens:
                out.truncated += 1
            h.update(json.dumps(record, sort_keys=True).encode())
            out.chosen.append(np.asarray(chosen[:max_tokens], dtype=np.int64))
            out.rejected.append(np.asarray(rejected[:max_tokens], dtype=np.int64))
            out.prompt.append(start)
        if len(out) == before:
            raise DataError(f"{path}: holds no preference pairs")
    out.fingerprint = h.hexdigest()[:20]
    return out


class PairBatches(ExampleBatches):
    """Batches of whole pairs, a pure function of (seed, step, rank, world_size), in ExampleBatches' order:
    (input_ids, labels, pair index) of 2 x batch_size rows, the chosen sequences first."""

    def __init__(self, pairs: Pairs, batch_size: int, pad_id: int, *, seed: int = 0, rank: int = 0, world_size=1):
        super().__init__(pairs, batch_size, pad_id, seed=seed, rank=rank, world_size=world_size)

    def batch(self, step: int):
        return self.examples.batch(self.indices(step), self.pad_id)


__all__ = ["PairBatches", "Pairs", "common_prefix", "encode_pair", "is_preference_file", "read_pairs"]
