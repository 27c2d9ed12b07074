"""The one decoding core: logits processing, token choice, stop text and incremental detokenising, per row.

A `Row` is one sequence being decoded: its prompt, its options and the state its processors need (tokens seen,
counts, n-grams, its own seeded generator, its text so far). `choose_tokens` picks the next token of many rows
at once, whatever options each has; `Row.push` takes the chosen token and says what text became final and
whether the row has ended. Two schedulers drive rows through the model: `generate_ids` here (a `StaticBatch`:
prompts left-padded together, sliding past the context) and the server's continuous batching
(serve/engine.py). Both give the same tokens for the same request, because a row's choices depend only on its
logits, its options and its seed (never on its neighbours in the batch or on the batch size). Beam search
(beams.py) is a third scheduler, over the same `StaticBatch` and logits processors.

Every option means what it means in transformers' `generate`, applied in the same order: repetition penalty
(then OpenAI's presence and frequency penalties), no-repeat n-grams and min_new_tokens first (they change which
tokens are allowed), then, only when sampling, temperature, top-k and top-p. Greedy decoding (`do_sample=False`
or `temperature=0`) picks the arg-max of the processed logits, so it reproduces transformers token for token.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

from .batching import StaticBatch
from .constraints import Constraint, make_constraint
from .errors import OptionError
from .inference.packed import cpu_inference_weights
from .model import GPT
from .options import SamplingOptions
from .progress import progress_bar
from .sampling import (
    NGramBan,
    apply_logit_bias,
    apply_presence_frequency,
    apply_repetition_penalty,
    apply_temperature,
    check_bias_fits,
    pick,
    process_logits,
    prompt_logprobs,
    row_seed,
    top_k_filter,
    top_p_filter,
)

# --- one row: its state, its text ------------------------------------------------------------------


class TextStream:
    """A row's text as its tokens arrive: cut at the first stop string, released as soon as it is final.

    Decoding is incremental: each new token decodes only the tokens since the last point where the text ended
    on a whole character (a byte-level token may hold half of a UTF-8 character, which decodes as U+FFFD until
    the rest arrives), so a row of n tokens costs O(n) decoding, not O(n^2). Text is held back while it could
    still be the start of a stop string.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.hold = max((len(s) - 1 for s in self.stop), default=0)
        self.text, self.sent, self.stopped = "", 0, False
        self.prefix = self.read = 0  # token offsets: decoding restarts at `prefix`; `read` tokens are in `text`
        self.head = 0  # the length of the text of tokens prefix:read (the last piece added to `text`)
        self.searched = 0  # text before this holds no stop string
        self.decoded_tokens = 0  # the decoding work done so far (tests count it)

    def _decode(self, ids: list[int]) -> str:
        self.decoded_tokens += len(ids)
        return self.tokenizer.decode(ids)

    def push(self, ids: list[int], final: bool = False) -> str:
        """New final text after the row became `ids` (all its tokens); `final` releases everything, half
        characters included. Sets `stopped` when a stop string appeared."""
        if self.stopped:
            return ""
        full = self._decode(ids[self.prefix :])
        if final or (len(full) > self.head and not full.endswith("\ufffd")):
            # text ends on a whole character at `read`, so the text of tokens read: is exactly what was added
            self.text += full[self.head :]
            self.prefix, self.read, self.head = self.read, len(ids), len(full) - self.head
        cut = min(
            (i for s in self.stop if (i := self.text.find(s, max(0, self.searched - len(s) + 1))) >= 0), default=-1
        )
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True
            return self.flush()
        self.searched = len(self.text)
        if final:
            return self.flush()
        safe = len(self.text) - self.hold
        piece = self.text[self.sent : safe] if safe > self.sent else ""
        self.sent += len(piece)
        return piece

    def flush(self) -> str:
        piece = self.text[self.sent :]
        self.sent = len(self.text)
        return piece


class Row:
    """One sequence being decoded: prompt, options, the state of its logits processors and its own generator.

    `index` is the sample's number within its request (its seed is `row_seed(seed, index)`); `text`, where
    given, follows the row's text and its stop strings. `finish` becomes "stop" (end of text or a stop string)
    or "length" when the row ends.
    """

    def __init__(
        self,
        prompt: list[int],
        opts: SamplingOptions,
        eos_id: int | None,
        vocab_size: int,
        device: torch.device | str = "cpu",
        index: int = 0,
        text: TextStream | None = None,
        logprobs: int | None = None,
        constraint: Constraint | None = None,
    ):
        self.prompt, self.opts, self.eos_id, self.text = prompt, opts, eos_id, text
        self.constraint = constraint  # structured output: the grammar the text must stay inside
        self.ids: list[int] = []
        self.finish: str | None = None
        # with `logprobs` (how many alternatives to keep, 0: none): each token's log-probability under the model's
        # own distribution (before any processor), and the most likely alternatives, as (token, log-probability)
        self.logprobs = logprobs
        self.token_logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []
        self._scored: tuple[float, list[tuple[int, float]]] | None = None
        self.seen = self.counts = self.generator = self.ngrams = None
        check_bias_fits(opts, vocab_size)
        if opts.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.seen[prompt] = True
        if opts.presence_penalty or opts.frequency_penalty:
            self.counts = torch.zeros(vocab_size, device=device)
        if opts.no_repeat_ngram_size:
            self.ngrams = NGramBan(opts.no_repeat_ngram_size, prompt)
        if opts.seed is not None and not opts.greedy:
            self.generator = torch.Generator(device=device).manual_seed(row_seed(opts.seed, index))

    @property
    def group(self) -> tuple:
        """Rows with equal groups are processed together."""
        o = self.opts
        return (
            o.greedy,
            o.temperature,
            o.top_k,
            o.top_p,
            o.repetition_penalty,
            o.presence_penalty,
            o.frequency_penalty,
            o.min_new_tokens,
            tuple(sorted(o.logit_bias.items())) if o.logit_bias else None,
        )

    def push(self, token: int) -> str:
        """Take the chosen token; returns the text that became final (with a `text`), and sets `finish` when the
        row ends."""
        if token == self.eos_id:
            self.finish = "stop"
            return self.text.push(self.ids, final=True) if self.text else ""
        self.ids.append(token)
        if self.constraint is not None:
            self.constraint.consume(token)
        if self._scored is not None:
            self.token_logprobs.append(self._scored[0])
            self.top_logprobs.append(self._scored[1])
            self._scored = None
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1
        if self.ngrams is not None:
            self.ngrams.add(token)
        last = len(self.ids) >= self.opts.max_new_tokens
        piece = self.text.push(self.ids, final=last) if self.text else ""
        if self.text and self.text.stopped:
            self.finish = "stop"
        elif last:
            self.finish = "length"
        return piece

    def stop_early(self) -> str:
        """End the row here (the caller's stop: a callback, a cancelled client); the text so far is final."""
        self.finish = self.finish or "stop"
        return self.text.push(self.ids, final=True) if self.text else ""


def _score(logits: torch.Tensor, rows: Sequence[Row], picked: torch.Tensor) -> None:
    """Keep the log-probability of each row's chosen token, and its top alternatives, for the rows that ask."""
    wanted = [j for j, r in enumerate(rows) if r.logprobs is not None]
    logp = logits[wanted].float().log_softmax(dim=-1)
    chosen = logp.gather(1, picked[wanted, None]).squeeze(1).tolist()
    k = max(rows[j].logprobs for j in wanted)
    top_values, top_ids = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
    for n, j in enumerate(wanted):
        alternatives = list(zip(top_ids[n].tolist(), top_values[n].tolist()))[: rows[j].logprobs]
        rows[j]._scored = (chosen[n], alternatives)


def row_constraint(opts: SamplingOptions, tokenizer, vocab_size: int, device) -> Constraint | None:
    """A row's structured-output constraint from its options (the tokenizer is needed to build one)."""
    if opts.json_schema is None and opts.regex is None:
        return None
    if tokenizer is None:
        raise OptionError(
            "json_schema and regex need the tokenizer: use generate(), or pass tokenizer= to generate_ids"
        )
    return make_constraint(tokenizer, vocab_size, json_schema=opts.json_schema, regex=opts.regex, device=device)


def choose_tokens(
    logits: torch.Tensor, rows: Sequence[Row], on_error: Callable[[Row, Exception], None] | None = None
) -> torch.Tensor:
    """The next token of each row from its (rows, V) logits; rows with the same options are processed together.

    A group whose processing fails (which would be a bug) raises, or, with `on_error`, ends only its own rows:
    they get end of text, and `on_error(row, error)` is called for each.
    """
    out = torch.empty(logits.size(0), dtype=torch.long, device=logits.device)
    if all(row.opts is rows[0].opts for row in rows):  # one request's rows share their options: one group
        groups = [list(range(len(rows)))]
    else:
        by_options: dict[tuple, list[int]] = {}
        for i, row in enumerate(rows):
            by_options.setdefault(row.group, []).append(i)
        groups = list(by_options.values())
    for members in groups:
        group = [rows[i] for i in members]
        whole = len(members) == len(rows)
        idx = None if whole else torch.tensor(members, device=logits.device)
        try:
            scores = logits.to(torch.float32, copy=True) if whole else logits.index_select(0, idx).float()
            opts = group[0].opts
            seen = torch.stack([r.seen for r in group]) if group[0].seen is not None else None
            counts = torch.stack([r.counts for r in group]) if group[0].counts is not None else None
            ngrams = [r.ngrams for r in group]
            for j, r in enumerate(group):  # structured output first: the processors choose among what it allows
                if r.constraint is not None:
                    scores[j].masked_fill_(~r.constraint.allowed(), float("-inf"))
            scores = process_logits(scores, opts, [len(r.ids) for r in group], group[0].eos_id, seen, ngrams, counts)
            eos = group[0].eos_id
            if eos is not None and any(r.constraint is not None for r in group):  # a complete text ends, even
                stuck = torch.isneginf(scores).all(dim=-1)  # before min_new_tokens
                scores[stuck, eos] = 0.0
            picked = pick(scores, opts.greedy, [r.generator for r in group])
            if any(r.logprobs is not None for r in group):
                _score(logits if whole else logits.index_select(0, idx), group, picked)
        except Exception as e:
            if on_error is None:
                raise
            for r in group:
                on_error(r, e)
            picked = torch.full((len(members),), max(group[0].eos_id or 0, 0), dtype=torch.long, device=out.device)
        if whole:
            return picked
        out[idx] = picked
    return out


# --- the static-batch scheduler ----------------------------------------------------------------------

OnToken = Callable[[int, Row, str], bool | None]


def _as_prompts(input_ids) -> list[list[int]]:
    if isinstance(input_ids, torch.Tensor):
        input_ids = input_ids.tolist() if input_ids.dim() == 2 else [input_ids.tolist()]
    elif not len(input_ids) or not hasattr(input_ids[0], "__len__"):  # ints, numpy ints
        input_ids = [list(input_ids)]  # one prompt; [] is one empty prompt
    return [list(map(int, p)) for p in input_ids]


def _checked_prompts(model: GPT, input_ids, eos_id: int | None) -> list[list[int]]:
    n_ctx, vocab = model.config.n_positions, model.config.vocab_size
    prompts = []
    for p in _as_prompts(input_ids):
        if not p:
            p = [eos_id if eos_id is not None else model.config.eos_token_id]
        if min(p) < 0 or max(p) >= vocab:
            raise OptionError(
                f"prompt token ids must be in [0, {vocab}) (the model's vocab_size); got {min(p)}..{max(p)}"
            )
        if len(p) > n_ctx:
            warnings.warn(
                f"prompt of {len(p)} tokens is longer than the model's context ({n_ctx}); "
                f"keeping its last {n_ctx} tokens"
            )
            p = p[-n_ctx:]
        prompts.append(p)
    return prompts


@torch.inference_mode()
def generate_ids(
    model: GPT,
    input_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
    options: SamplingOptions | None = None,
    *,
    eos_id: int | None = -1,
    context_keep: int | None = None,
    on_token: OnToken | None = None,
    text: Callable[[int], TextStream] | None = None,
    tokenizer=None,
    progress: bool = False,
    **sampling,
) -> list[list[int]]:
    """Generate from token-id prompts; returns the new tokens of each sample (without eos).

    `input_ids` is one prompt (list of ids or 1-D tensor) or several (list of lists or a 2-D tensor). The sampling
    options are a `SamplingOptions` and/or its fields as keywords (`max_new_tokens=`, `temperature=`, `top_k=`,
    ...; see there and transformers' `generate`). Each prompt gives `num_samples` samples, in order: prompt 0's
    samples first. Sampling stops at `eos_id` (default: the model's eos_token_id; None to never stop early). An
    empty prompt starts from eos. A prompt longer than the context keeps its last n_positions tokens, with a
    warning. Prompts of different lengths share one left-padded batch: padding is masked out of attention, and
    position ids count only real tokens, as transformers does. When a sequence reaches the model's context,
    generation continues by sliding the window: the last `context_keep` tokens are kept and their cache is
    recomputed, so the model always sees positions it was trained on.

    `text(sample)` may give each sample a `TextStream`; `on_token(sample, row, piece)` is called after every token
    of an unfinished row, with the text that became final; returning True ends that row.

    With `num_beams` > 1 (and greedy decoding) each prompt is searched with that many beams (beams.py, transformers'
    beam search) and gives its `num_samples` best hypotheses, best first; `text` and `on_token` are refused.
    """
    opts = SamplingOptions.make(options, **sampling)
    check_bias_fits(opts, model.config.vocab_size)
    n_ctx = model.config.n_positions
    if eos_id == -1:
        eos_id = model.config.eos_token_id
    keep = max(1, n_ctx * 3 // 4) if context_keep is None else context_keep
    if not 0 < keep < n_ctx:
        raise OptionError(f"context_keep={context_keep} must be between 1 and n_positions-1={n_ctx - 1}")
    prompts = _checked_prompts(model, input_ids, eos_id)
    if opts.num_beams > 1 and (on_token is not None or text is not None):
        raise OptionError(
            f"num_beams={opts.num_beams}: beam search knows its text only at the end; streaming and "
            "stop strings need num_beams=1"
        )
    was_training = model.training
    model.eval()
    try:
        bar = progress_bar(len(prompts) * opts.num_samples, desc="generate", unit="sample", enabled=progress)
        with cpu_inference_weights(model, keep=not was_training):  # a model in training keeps no copies
            if opts.num_beams > 1:
                from .beams import beam_search  # beams.py builds on this module

                out = beam_search(model, prompts, opts, eos_id, keep, bar)
            else:
                out = _sample(model, prompts, opts, eos_id, keep, on_token, text, tokenizer, bar)
        bar.close()
        return out
    finally:
        model.train(was_training)


def _sample(
    model: GPT, prompts, opts: SamplingOptions, eos_id, keep: int, on_token, text, tokenizer, bar
) -> list[list[int]]:
    """Decode `num_samples` rows per prompt, `batch_size` rows at a time."""
    prompts = [p for p in prompts for _ in range(opts.num_samples)]
    device = model.transformer.wte.weight.device
    rows = [
        Row(
            p,
            opts,
            eos_id,
            model.config.vocab_size,
            device,
            i,
            text(i) if text else None,
            constraint=row_constraint(opts, tokenizer, model.config.vocab_size, device),
        )
        for i, p in enumerate(prompts)
    ]
    for start in range(0, len(rows), opts.batch_size):
        batch = rows[start : start + opts.batch_size]
        watch = None if on_token is None else (lambda i, row, piece, _s=start: on_token(_s + i, row, piece))
        _decode_batch(model, batch, keep, watch)
        bar.update(len(batch))
    return [row.ids for row in rows]


def _decode_batch(model: GPT, rows: list[Row], keep: int, on_token: OnToken | None) -> None:
    """Decode a static batch of rows to their ends, one token per row per step."""
    pad = rows[0].eos_id if rows[0].eos_id is not None else 0
    max_new = rows[0].opts.max_new_tokens
    batch = StaticBatch(model, [r.prompt for r in rows], pad, max_new, keep)
    for _ in range(max_new):
        nxt = choose_tokens(batch.logits, rows)
        for i, (row, token) in enumerate(zip(rows, nxt.tolist())):
            if row.finish is None:
                piece = row.push(token)
                if on_token is not None and on_token(i, row, piece) and row.finish is None:
                    on_token(i, row, row.stop_early())
        if all(r.finish is not None for r in rows):
            return
        batch.advance(nxt)


# --- the text layer --------------------------------------------------------------------------------


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
    Beam search (`num_beams` > 1) returns whole texts: `stop` and `stream` are refused with it.
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise OptionError('no prompt given; pass a string ("" starts from <|endoftext|>) or a list of strings')
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    opts = SamplingOptions.make(options, **sampling)
    n = opts.num_samples
    if opts.num_beams > 1:
        return _beam_texts(model, tokenizer, prompts, opts, stop, stream, include_prompt, context_keep, progress)
    texts = [TextStream(tokenizer, stop) for _ in range(len(prompts) * n)]
    started = [False] * len(texts)

    def emit(sample: int, row: Row, piece: str) -> None:
        if stream is None:
            return
        if not started[sample]:  # a sample's prompt goes out just before its first new text
            started[sample] = True
            if include_prompt and prompts[sample // n]:
                stream(sample, prompts[sample // n])
        if piece:
            stream(sample, piece)

    generate_ids(
        model,
        [tokenizer.encode(p) if p else [] for p in prompts],
        opts,
        eos_id=tokenizer.eos_id,
        context_keep=context_keep,
        on_token=emit,
        text=texts.__getitem__,
        tokenizer=tokenizer,
        progress=progress,
    )
    return [(prompts[i // n] if include_prompt else "") + t.text for i, t in enumerate(texts)]


def _beam_texts(model, tokenizer, prompts, opts, stop, stream, include_prompt, context_keep, progress) -> list[str]:
    if stop or stream is not None:
        raise OptionError(
            f"num_beams={opts.num_beams}: beam search knows its text only at the end; "
            f"{'stop strings' if stop else 'streaming'} need num_beams=1"
        )
    ids = generate_ids(
        model,
        [tokenizer.encode(p) if p else [] for p in prompts],
        opts,
        eos_id=tokenizer.eos_id,
        context_keep=context_keep,
        progress=progress,
    )
    n = opts.num_samples
    return [(prompts[i // n] if include_prompt else "") + tokenizer.decode(row) for i, row in enumerate(ids)]


__all__ = ["NGramBan", "Row", "SamplingOptions", "TextStream", "apply_presence_frequency", "apply_repetition_penalty"]
__all__ += [
    "apply_logit_bias",
    "check_bias_fits",
    "apply_temperature",
    "choose_tokens",
    "generate",
    "generate_ids",
    "pick",
    "process_logits",
]
__all__ += ["prompt_logprobs", "row_constraint", "row_seed", "top_k_filter", "top_p_filter"]
