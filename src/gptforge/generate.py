"""Sampling from a GPT with the KV cache: the token-level core, the text layer on top, streaming.

Every option means what it means in transformers' `generate`, applied in the same order: repetition
penalty, no-repeat n-grams and min_new_tokens first (they change which tokens are allowed), then, only
when sampling, temperature, top-k and top-p. Greedy decoding (`do_sample=False` or `temperature=0`)
picks the arg-max of the processed logits, so it reproduces transformers token for token.

Prompts of different lengths share one left-padded batch: padding is masked out of attention, and
position ids count only real tokens, as transformers does. When a sequence reaches the model's context,
generation continues by sliding the window: the last `context_keep` tokens are kept and their cache is
recomputed from scratch, so the model always sees positions it was trained on.
"""
from __future__ import annotations

import hashlib
import warnings
from typing import Callable, Sequence

import torch

from .errors import OptionError
from .fastdecode import decoder
from .kernels import cpu_inference_weights
from .model import GPT
from .options import SamplingOptions
from .progress import progress_bar


# --- logits processors (each the counterpart of one transformers LogitsProcessor) ------------------


def apply_repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive and multiply negative logits of tokens already seen (prompt and output).

    `seen` is a (B, V) boolean mask. A mask rather than a list of ids makes the cost independent of
    the length of the text, and a token seen twice is penalised once, as in transformers.
    """
    penalised = torch.where(scores > 0, scores / penalty, scores * penalty)
    return torch.where(seen, penalised, scores)


def apply_temperature(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature >= 1.0:
        return scores / temperature if temperature != 1.0 else scores
    # a tiny temperature (1e-39) overflows the best scores to +inf, and softmax of inf is NaN: keep them finite
    return (scores / temperature).clamp_(max=torch.finfo(scores.dtype).max)


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


class _NGramBan:
    """No-repeat n-grams for one row: remembers every (n-1)-token prefix and the tokens that followed it."""

    def __init__(self, n: int, ids: Sequence[int]):
        self.n, self.ids, self.table = n, [], {}
        for t in ids:
            self.add(t)

    def add(self, token: int) -> None:
        self.ids.append(token)
        if len(self.ids) >= self.n:
            gram = tuple(self.ids[-self.n:])
            self.table.setdefault(gram[:-1], set()).add(gram[-1])

    def banned(self) -> set[int]:
        if len(self.ids) + 1 < self.n:
            return set()
        prefix = tuple(self.ids[len(self.ids) - self.n + 1:]) if self.n > 1 else ()
        return self.table.get(prefix, set())


def process_logits(
    scores: torch.Tensor,
    opts: SamplingOptions,
    step: int,
    eos_id: int | None,
    seen: torch.Tensor | None = None,
    ngrams: list[_NGramBan] | None = None,
) -> torch.Tensor:
    """All processors for one decoding step in transformers' order; `scores` is (B, V) float."""
    if opts.repetition_penalty != 1.0 and seen is not None:
        scores = apply_repetition_penalty(scores, seen, opts.repetition_penalty)
    if ngrams:
        for row, ban in enumerate(ngrams):
            if ban is not None and (banned := ban.banned()):
                scores[row, list(banned)] = float("-inf")
    if step < opts.min_new_tokens and eos_id is not None:
        scores[:, eos_id] = float("-inf")
    if not opts.greedy:
        scores = top_p_filter(top_k_filter(apply_temperature(scores, opts.temperature), opts.top_k), opts.top_p)
    return scores


def _pick(scores: torch.Tensor, greedy: bool, generator: torch.Generator | None) -> torch.Tensor:
    if greedy:
        return scores.argmax(dim=-1)
    probs = scores.softmax(dim=-1)
    # Exponential race (Gumbel-max in another form): argmax(p / E) with E ~ Exp(1) is a draw from p.
    # One elementwise pass; cheaper than torch.multinomial and never syncs with the host.
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(dim=-1)


# --- the token-level core --------------------------------------------------------------------------


Callback = Callable[[int, list[int]], bool | None]


def _as_prompts(input_ids) -> list[list[int]]:
    if isinstance(input_ids, torch.Tensor):
        input_ids = input_ids.tolist() if input_ids.dim() == 2 else [input_ids.tolist()]
    elif not len(input_ids) or not hasattr(input_ids[0], "__len__"):  # ints, numpy ints
        input_ids = [list(input_ids)]  # one prompt; [] is one empty prompt
    return [list(map(int, p)) for p in input_ids]


def _batch_seed(seed: int, start: int) -> int:
    """The seed of the batch that starts at sample `start`: `seed` itself for the first, then a hash of both, so
    that seed 1 does not repeat seed 0's second batch."""
    if start == 0:
        return seed
    return int.from_bytes(hashlib.blake2b(f"{seed}:{start}".encode(), digest_size=8).digest(), "little")


@torch.inference_mode()
def generate_ids(
    model: GPT,
    input_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
    options: SamplingOptions | None = None,
    *,
    eos_id: int | None = -1,
    context_keep: int | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    **sampling,
) -> list[list[int]]:
    """Generate from token-id prompts; returns the new tokens of each sample (without eos).

    `input_ids` is one prompt (list of ids or 1-D tensor) or several (list of lists or a 2-D tensor).
    The sampling options are a `SamplingOptions` and/or its fields as keywords (`max_new_tokens=`,
    `temperature=`, `top_k=`, ...; see there and transformers' `generate`). Each prompt gives `num_samples` samples, in order: prompt 0's samples first. Sampling stops at
    `eos_id` (default: the model's eos_token_id; None to never stop early). An empty prompt starts
    from eos. A prompt longer than the context keeps its last n_positions tokens, with a warning.
    `callback(row, new_ids)` is called after every new token of an unfinished row (for streaming and
    stop strings); returning True ends that row. `progress` shows a bar over the samples.
    """
    opts = SamplingOptions.make(options, **sampling)
    n_ctx = model.config.n_positions
    if eos_id == -1:
        eos_id = model.config.eos_token_id
    keep = max(1, n_ctx * 3 // 4) if context_keep is None else context_keep
    if not 0 < keep < n_ctx:
        raise OptionError(f"context_keep={context_keep} must be between 1 and n_positions-1={n_ctx - 1}")
    prompts = []
    vocab = model.config.vocab_size
    for p in _as_prompts(input_ids):
        if not p:
            p = [eos_id if eos_id is not None else model.config.eos_token_id]
        if min(p) < 0 or max(p) >= vocab:
            raise OptionError(f"prompt token ids must be in [0, {vocab}) (the model's vocab_size); got {min(p)}..{max(p)}")
        if len(p) > n_ctx:
            warnings.warn(f"prompt of {len(p)} tokens is longer than the model's context ({n_ctx}); keeping its last {n_ctx} tokens")
            p = p[-n_ctx:]
        prompts += [p] * opts.num_samples
    device = model.transformer.wte.weight.device
    was_training = model.training
    model.eval()
    try:
        out: list[list[int]] = []
        bar = progress_bar(len(prompts), desc="generate", unit="sample", enabled=progress)
        with cpu_inference_weights(model, keep=not was_training):  # a model in training keeps no copies
            for start in range(0, len(prompts), opts.batch_size):
                batch = prompts[start:start + opts.batch_size]
                # each batch its own seeded generator: how many numbers an earlier batch drew (it may stop as soon
                # as its rows end, when a stop text or a stream looks at every step) never changes a later one
                generator = None if opts.seed is None else torch.Generator(device=device).manual_seed(_batch_seed(opts.seed, start))
                row_callback = None
                if callback is not None:
                    row_callback = lambda row, ids, _s=start: callback(_s + row, ids)  # noqa: E731
                out += _generate_batch(model, batch, opts, eos_id, keep, generator, row_callback)
                bar.update(len(batch))
        bar.close()
        return out
    finally:
        model.train(was_training)


def _generate_batch(model: GPT, prompts: list[list[int]], opts: SamplingOptions, eos_id: int | None, keep: int,
                    generator: torch.Generator | None, callback: Callback | None) -> list[list[int]]:
    device = model.transformer.wte.weight.device
    B, n_ctx = len(prompts), model.config.n_positions
    T0 = max(map(len, prompts))
    padded = any(len(p) < T0 for p in prompts)
    pad = eos_id if eos_id is not None else 0
    total = T0 + opts.max_new_tokens
    # Every token so far (left-padded), and which are real: needed to rebuild the cache when sliding.
    tokens = torch.full((B, total), pad, dtype=torch.long, device=device)
    real = torch.zeros((B, total), dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, T0 - len(p):T0] = torch.tensor(p, device=device)
        real[i, T0 - len(p):T0] = True
    real[:, T0:] = True
    seen = _seen_tokens(prompts, model.config.vocab_size, device) if opts.repetition_penalty != 1.0 else None
    ngrams = [_NGramBan(opts.no_repeat_ngram_size, p) for p in prompts] if opts.no_repeat_ngram_size else None

    cache = model.new_cache(B, min(n_ctx, total))
    step_in_c = decoder(model, B)  # the whole decoding step in one C call where it applies (fastdecode.py)
    window_start = 0  # column of `tokens` where the cached window begins

    def prefill(end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(Re)compute the cache for tokens[window_start:end]; last-position logits and next position ids."""
        cache.length = 0
        mask = real[:, window_start:end]
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        logits, _ = model(tokens[:, window_start:end], cache=cache, position_ids=pos,
                          attention_mask=mask if padded else None, logits_to_keep=1)
        return logits[:, -1], pos[:, -1:] + 1

    logits, next_pos = prefill(T0)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    done_host = [False] * B
    lengths = [opts.max_new_tokens] * B
    host_every = 1 if (callback is not None or ngrams) else 8  # host syncs are cheap on CPU, not on GPU
    for step in range(opts.max_new_tokens):
        col = T0 + step
        scores = process_logits(logits.float(), opts, step, eos_id, seen, ngrams)
        nxt = _pick(scores, opts.greedy, generator)
        if eos_id is not None:
            nxt = nxt.masked_fill(finished, eos_id)
            finished |= nxt == eos_id
        tokens[:, col] = nxt
        if seen is not None:
            seen.scatter_(1, nxt[:, None], True)
        if step % host_every == host_every - 1 or step == opts.max_new_tokens - 1:
            fin = finished.tolist()
            if ngrams or callback is not None:
                _host_step(step, nxt.tolist(), fin, tokens[:, T0:col + 1], finished, done_host, lengths, ngrams, callback)
            if all(fin) or all(done_host):
                break
        if step == opts.max_new_tokens - 1:
            break
        if col + 1 - window_start > cache.max_len:  # the context is full: slide the window
            window_start = col + 1 - keep
            logits, next_pos = prefill(col + 1)
            continue
        mask = real[:, window_start:col + 1] if padded else None
        if step_in_c is not None:
            logits = step_in_c(nxt, next_pos, cache, mask)
        else:
            logits, _ = model(nxt[:, None], cache=cache, position_ids=next_pos, attention_mask=mask, logits_to_keep=1)
            logits = logits[:, -1]
        next_pos = next_pos + 1

    rows = tokens[:, T0:].tolist()
    out = []
    for i, row in enumerate(rows):
        row = row[:lengths[i]]
        if eos_id is not None and eos_id in row:  # rows finished between host checks
            row = row[:row.index(eos_id)]
        out.append(row)
    return out


def _seen_tokens(prompts: list[list[int]], vocab_size: int, device) -> torch.Tensor:
    """(B, V) mask of the tokens each prompt holds, for the repetition penalty."""
    seen = torch.zeros((len(prompts), vocab_size), dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        seen[i, p] = True
    return seen


def _host_step(step: int, new: list[int], fin: list[bool], generated: torch.Tensor, finished: torch.Tensor,
               done_host: list[bool], lengths: list[int], ngrams, callback) -> None:
    """The per-row work on the host after a token: finished rows, no-repeat n-grams, and the callback (which may
    end a row: streaming and stop strings)."""
    for i in range(len(new)):
        if done_host[i]:
            continue
        if fin[i]:
            done_host[i], lengths[i] = True, step
            continue
        if ngrams:
            ngrams[i].add(new[i])
        if callback is not None and callback(i, generated[i].tolist()):
            done_host[i], lengths[i] = True, step + 1
            finished[i] = True


# --- the text layer --------------------------------------------------------------------------------


class _StopText:
    """Decodes one row as it grows, cuts it at the first stop string, and releases text that is final.

    Text is held back while it could still be the start of a stop string, or while it ends in an
    incomplete UTF-8 character (the replacement character from decoding half a byte sequence).
    """

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.hold = max((len(s) - 1 for s in self.stop), default=0)
        self.text, self.sent, self.stopped = "", 0, False

    def update(self, ids: list[int]) -> str:
        """New final text after the row became `ids`; sets `stopped` when a stop string appeared."""
        self.text = self.tokenizer.decode(ids)
        cut = min((i for s in self.stop if (i := self.text.find(s)) >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True
            return self.flush()
        safe = len(self.text) - self.hold
        while safe > self.sent and self.text[safe - 1] == "\ufffd":
            safe -= 1
        piece = self.text[self.sent:safe] if safe > self.sent else ""
        self.sent += len(piece)
        return piece

    def flush(self) -> str:
        piece = self.text[self.sent:]
        self.sent = len(self.text)
        return piece


def generate(
    model: GPT,
    tokenizer,
    prompt: str | list[str] = "",
    options: SamplingOptions | None = None,
    *,
    stop: str | Sequence[str] | None = None,
    include_prompt: bool = True,
    stream: Callable[[int, str], None] | None = None,
    context_keep: int | None = None,
    progress: bool = False,
    **sampling,
) -> list[str]:
    """Generate text: one string per sample, prompt 0's `num_samples` samples first.

    The sampling options are a `SamplingOptions` and/or its fields as keywords, as in `generate_ids`.
    Generation stops at the tokenizer's end-of-text token and at the first of the `stop` strings (which
    is not included). `stream(sample, text)` receives each piece of final text as soon as it is known.
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise OptionError("no prompt given; pass a string (\"\" starts from <|endoftext|>) or a list of strings")
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    opts = SamplingOptions.make(options, **sampling)
    n = opts.num_samples
    texts = [_StopText(tokenizer, stop) for _ in range(len(prompts) * n)]
    started = [False] * len(texts)

    def emit(row: int, piece: str) -> None:
        if stream is None:
            return
        if not started[row]:  # a sample's prompt goes out just before its first new text
            started[row] = True
            if include_prompt and prompts[row // n]:
                stream(row, prompts[row // n])
        if piece:
            stream(row, piece)

    def on_token(row: int, ids: list[int]) -> bool:
        emit(row, texts[row].update(ids))
        return texts[row].stopped

    eos = tokenizer.eos_id
    ids = generate_ids(model, [tokenizer.encode(p) if p else [] for p in prompts], eos_id=eos,
                       context_keep=context_keep, callback=on_token if (stop or stream) else None, options=opts,
                       progress=progress)
    out = []
    for row, new in enumerate(ids):
        t = texts[row]
        t.update(new)  # the whole row: also cuts a stop string that the last host check missed
        emit(row, t.flush())
        out.append((prompts[row // n] if include_prompt else "") + t.text)
    return out


__all__ = [
    "SamplingOptions",
    "apply_repetition_penalty",
    "apply_temperature",
    "generate",
    "generate_ids",
    "process_logits",
    "top_k_filter",
    "top_p_filter",
]
