"""Logits processing and token choice for one decoding step: the tensor half of the decoding core (generate.py).

Each processor is the counterpart of one transformers LogitsProcessor and applies in transformers' order
(`process_logits`); `pick` chooses a token per row, greedily or by a draw from each row's own generator.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from .errors import OptionError
from .options import SamplingOptions

# --- logits processors (each the counterpart of one transformers LogitsProcessor) ------------------


def apply_repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive and multiply negative logits of tokens already seen (prompt and output).

    `seen` is a (B, V) boolean mask. A mask rather than a list of ids makes the cost independent of
    the length of the text, and a token seen twice is penalised once, as in transformers.
    """
    penalised = torch.where(scores > 0, scores / penalty, scores * penalty)
    return torch.where(seen, penalised, scores)


def apply_presence_frequency(scores: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float):
    """OpenAI's penalties: subtract `frequency` per earlier occurrence in the output, and `presence` once."""
    return scores - frequency * counts - presence * (counts > 0).to(scores.dtype)


def apply_logit_bias(scores: torch.Tensor, bias: dict[int, float]) -> torch.Tensor:
    """OpenAI's logit_bias: add each token's bias to its logit in every row (-100 all but bans it)."""
    ids = torch.tensor(list(bias), dtype=torch.long, device=scores.device)
    values = torch.tensor(list(bias.values()), dtype=scores.dtype, device=scores.device)
    return scores.index_add(-1, ids, values.expand(scores.size(0), -1))


def apply_temperature(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide by the temperature. Below 1 the best score is first moved to 0 (softmax does not change): a tiny
    temperature then sends every other score to -inf instead of overflowing the best ones to +inf, where they
    would tie, or all-negative scores to -inf, where softmax is NaN."""
    if temperature == 1.0:
        return scores
    if temperature > 1.0:
        return scores / temperature
    best = scores.amax(dim=-1, keepdim=True)
    return (scores - best.nan_to_num(neginf=0.0)) / temperature


def top_k_filter(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k highest logits (and any tied with the k-th); the rest become -inf."""
    if k <= 0 or k >= scores.size(-1):
        return scores
    kth = torch.topk(scores, k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, float("-inf"))


def top_p_filter(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches p.

    A token survives when the probability of all strictly more likely tokens is still below p, so the
    most likely token always survives.
    """
    if p >= 1.0:
        return scores
    ordered, order = torch.sort(scores, dim=-1, descending=True)
    probs = ordered.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above each one
    drop = before >= p
    drop[..., 0] = False
    return scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


class NGramBan:
    """No-repeat n-grams for one row: remembers every (n-1)-token prefix and the tokens that followed it."""

    def __init__(self, n: int, ids: Sequence[int]):
        self.n, self.ids, self.table = n, [], {}
        for t in ids:
            self.add(t)

    def add(self, token: int) -> None:
        self.ids.append(token)
        if len(self.ids) >= self.n:
            gram = tuple(self.ids[-self.n :])
            self.table.setdefault(gram[:-1], set()).add(gram[-1])

    def banned(self) -> set[int]:
        if len(self.ids) + 1 < self.n:
            return set()
        prefix = tuple(self.ids[len(self.ids) - self.n + 1 :]) if self.n > 1 else ()
        return self.table.get(prefix, set())


def process_logits(
    scores: torch.Tensor,
    opts: SamplingOptions,
    step: int | Sequence[int],
    eos_id: int | None,
    seen: torch.Tensor | None = None,
    ngrams: Sequence[NGramBan | None] | None = None,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """All processors for one decoding step in transformers' order; `scores` is (B, V) float, `step` the number
    of tokens each row has generated (one number for all, or one per row)."""
    if opts.repetition_penalty != 1.0 and seen is not None:
        scores = apply_repetition_penalty(scores, seen, opts.repetition_penalty)
    if counts is not None and (opts.presence_penalty or opts.frequency_penalty):
        scores = apply_presence_frequency(scores, counts, opts.presence_penalty, opts.frequency_penalty)
    if opts.logit_bias:
        scores = apply_logit_bias(scores, opts.logit_bias)
    for row, ban in enumerate(ngrams or ()):
        if ban is not None and (banned := ban.banned()):
            scores[row, list(banned)] = float("-inf")
    if eos_id is not None and opts.min_new_tokens:
        steps = [step] * scores.size(0) if isinstance(step, int) else step
        early = [row for row, s in enumerate(steps) if s < opts.min_new_tokens]
        if early:
            scores[early, eos_id] = float("-inf")
    if not opts.greedy:
        scores = top_p_filter(top_k_filter(apply_temperature(scores, opts.temperature), opts.top_k), opts.top_p)
    return scores


def prompt_logprobs(logits: torch.Tensor, prompt: list[int], k: int) -> tuple[list[float | None], list[list]]:
    """The log-probability of each prompt token given the ones before it (None for the first), and the top `k`
    alternatives at each position, from the logits of the prompt's positions (one row per prompt token)."""
    logp = logits[: len(prompt) - 1].float().log_softmax(dim=-1)
    target = torch.tensor(prompt[1:], device=logits.device, dtype=torch.long)
    chosen = logp.gather(1, target[:, None]).squeeze(1).tolist() if len(prompt) > 1 else []
    if k:
        values, ids = logp.topk(k, dim=-1)
        top = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        top = [[] for _ in chosen]
    return [None, *chosen], [[], *top]


def check_bias_fits(opts: SamplingOptions, vocab_size: int) -> None:
    """Every token of `logit_bias` is in the vocabulary."""
    outside = [t for t in opts.logit_bias or () if t >= vocab_size]
    if outside:
        error = OptionError(f"logit_bias: token id {outside[0]} is not in the vocabulary (ids 0 to {vocab_size - 1})")
        error.param = "logit_bias"
        raise error


def pick(scores: torch.Tensor, greedy: bool, generators: Sequence[torch.Generator | None] = ()) -> torch.Tensor:
    """One token per row of processed scores: the arg-max, or a draw from their softmax.

    A draw is an exponential race (Gumbel-max in another form): argmax(p / E) with E ~ Exp(1) is a draw from p,
    one elementwise pass that never syncs with the host. Each row draws its E from its own generator (None: torch's
    global one), so a row's tokens never depend on the other rows of its batch.
    """
    if greedy:
        return scores.argmax(dim=-1)
    probs = scores.softmax(dim=-1)
    if not generators or all(g is None for g in generators):
        race = torch.empty_like(probs).exponential_(1.0)
    else:
        race = torch.empty_like(probs)
        for row, g in zip(race, generators):  # each row's numbers from its own generator, in place
            row.exponential_(1.0, generator=g)
    return probs.div_(race).argmax(dim=-1)


def row_seed(seed: int, index: int) -> int:
    """The seed of sample `index` of a request: `seed` itself for the first, then a hash of both, so that
    seed 1's first sample is not seed 0's second."""
    if index == 0:
        return seed
    return int.from_bytes(hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest(), "little")
