"""Continuous batching: one model thread decodes every running sequence together, step by step.

Sequences join the running batch at the next step (their prompts are prefilled together, straight into
the shared cache) and leave it the moment they finish or their client goes away, so a short request
never waits for a long one. The cache (`RowCache`) holds one row per running sequence; all rows end at
the same column, the one the next token is written to, and each row's real tokens are the last
`lens[row]` columns before it (left padding, masked out of attention). Position ids count real tokens
only, so every row sees exactly the positions it would see alone -- the reason greedy decoding here
gives the tokens `generate_ids` gives. A prompt whose beginning is in the prefix cache (prefix.py) has those
columns copied in and computes only the rest; rows under different adapters (adapters.py) share each pass.

The engine talks to the web side through callbacks: `Sequence.emit(event)` is called from the model
thread and must be thread-safe (the app hands over `loop.call_soon_threadsafe`).
"""

from __future__ import annotations

import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..constraints import Constraint
from ..generate import Row, TextStream, choose_tokens, prompt_logprobs, row_constraint
from ..inference import fastdecode
from ..inference.packed import cpu_inference_weights  # packed fp32 weights for the CPU's decoding products
from ..model import GPT
from ..options import SamplingOptions
from .prefix import PrefixCache


@dataclass
class Event:
    """What the model thread reports for one sequence: new text, or the end (`finish` set)."""

    choice: int
    text: str = ""
    finish: str | None = None  # "stop", "length", or "error"
    completion_tokens: int = 0
    error: str | None = None
    # with log-probabilities asked for: (token, log-probability or None, top alternatives) of each token this
    # event covers -- the prompt's, in a first event of its own, then the generated ones up to this event
    logprobs: list[tuple[int, float | None, list[tuple[int, float]]]] | None = None


@dataclass
class Sequence:
    """One generated choice: its prompt ids, options and where its text goes. `choice` is its number within the
    request, which also picks its seed (generate.row_seed), as a sample's number does in `gptforge generate`."""

    prompt: list[int]
    opts: SamplingOptions
    emit: Callable[[Event], None]
    choice: int = 0
    stop: list[str] = field(default_factory=list)
    cancelled: bool = False  # set from the web side; the model thread drops the row at its next step
    logprobs: int | None = None  # report log-probabilities, with this many top alternatives per token
    prompt_logprobs: bool = False  # also the prompt's own (OpenAI's echo), in a first event
    constraint: Constraint | None = None  # its request's grammar, compiled once: the row takes a fresh copy
    adapter: int = 0  # which adapter it runs under (0: the base model; see serve/adapters.py)
    row: Row | None = None  # the decoding state, made by the engine when the sequence starts
    reported: int = 0  # tokens whose log-probabilities went out
    cached: int = 0  # prompt tokens whose keys and values came from the prefix cache
    finished: bool = False  # its end was reported (a cancel after that frees nothing)
    hit: tuple | None = None  # the prefix cache's blocks for its prompt, looked up when it is about to join
    times: list[float] = field(default_factory=list)  # submitted, first token, last token (monotonic seconds)


class RowCache:
    """Keys and values for rows that join and leave: (rows, heads, columns, head_dim) buffers per layer.

    It is the `KVCache` interface that `GPT.forward` uses (`length`, `update`), over a window of the
    buffers: rows `r0:r1`, columns from `col0`. Decoding sees all running rows and every column;
    prefilling new rows sees only their rows and the columns just before the shared end.
    """

    def __init__(self, model: GPT, rows: int, cols: int):
        c, p = model.config, model.transformer.wte.weight
        self.shape = (c.n_layer, c.n_head, c.head_dim)
        self.device, self.dtype = p.device, p.dtype
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.real = torch.zeros(0, 0, dtype=torch.bool, device=self.device)
        self.resize(rows, cols, 0, 0)
        self.r0 = self.r1 = self.col0 = self.length = 0

    def resize(self, rows: int, cols: int, used_rows: int, used_cols: int) -> None:
        """New buffers of `rows` x `cols`, keeping the first `used_rows` rows and `used_cols` columns."""
        n_layer, heads, dim = self.shape

        def grow(t: torch.Tensor | None) -> torch.Tensor:
            new = torch.zeros(rows, heads, cols, dim, device=self.device, dtype=self.dtype)
            if t is not None:
                new[:used_rows, :, :used_cols] = t[:used_rows, :, :used_cols]
            return new

        self.k = [grow(self.k[i] if self.k else None) for i in range(n_layer)]
        self.v = [grow(self.v[i] if self.v else None) for i in range(n_layer)]
        real = torch.zeros(rows, cols, dtype=torch.bool, device=self.device)
        real[:used_rows, :used_cols] = self.real[:used_rows, :used_cols]
        self.real = real

    @property
    def rows(self) -> int:
        return self.real.size(0)

    @property
    def cols(self) -> int:
        return self.real.size(1)

    def window(self, r0: int, r1: int, col0: int, length: int) -> "RowCache":
        self.r0, self.r1, self.col0, self.length = r0, r1, col0, length
        return self

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.col0 + self.length
        end = start + k.size(2)
        rows = slice(self.r0, self.r1)
        self.k[layer][rows, :, start:end] = k
        self.v[layer][rows, :, start:end] = v
        return self.k[layer][rows, :, self.col0 : end], self.v[layer][rows, :, self.col0 : end]

    def move_row(self, src: int, dst: int, cols: int) -> None:
        for t in self.k + self.v:
            t[dst, :, :cols] = t[src, :, :cols]
        self.real[dst, :cols] = self.real[src, :cols]

    def shift(self, rows: int, start: int, end: int, to: int) -> None:
        """Move columns start:end of the first `rows` rows so that they begin at column `to`."""
        for t in self.k + self.v:
            t[:rows, :, to : to + end - start] = t[:rows, :, start:end].clone()
        block = self.real[:rows, start:end].clone()
        self.real[:rows, :] = False
        self.real[:rows, to : to + end - start] = block


class Engine:
    """Runs the model in one background thread over a continuously changing batch of sequences.

    `max_batch` sequences decode together; up to `max_queue` more wait their turn. `submit` refuses
    (returns False) beyond that, which the server answers with 429. `prefill_tokens` bounds how many
    prompt tokens join in one step, so that a burst of long prompts does not stall running streams.
    """

    def __init__(
        self,
        model: GPT,
        tokenizer,
        max_batch: int = 32,
        max_queue: int = 256,
        prefill_tokens: int = 1024,
        prefix_cache_bytes: int = 0,
        metrics=None,
        adapters=None,
    ):
        self.model, self.tokenizer = model.eval(), tokenizer
        # prompts' shared beginnings (serve/prefix.py), the metrics (serve/metrics.py), and the adapters each row
        # runs under (serve/adapters.py)
        self.prefix = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self.metrics, self.adapters = metrics, adapters
        self.cancelled = 0  # sequences whose client left before their end
        self.eos = tokenizer.eos_id
        self.n_ctx = model.config.n_positions
        self.vocab = model.config.vocab_size
        self.device = model.transformer.wte.weight.device
        self.max_batch, self.max_queue, self.prefill_tokens = max_batch, max_queue, prefill_tokens
        self.cache = RowCache(model, min(max_batch, 4), min(self.n_ctx, 128))
        self._c_step: fastdecode.Decoder | None = None  # made in the model thread
        self.running: list[Sequence] = []
        self.waiting: list[Sequence] = []
        self.logits: torch.Tensor | None = None  # (running, vocab): the next-token logits of each row
        self.lens: list[int] = []  # real tokens cached per row
        self._joining: list[Sequence] = []  # being prefilled this step
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._load = 0  # sequences submitted and not yet finished
        self._stopping = False
        self.steps = 0  # decoding steps so far, and the rows they decoded (mean batch = rows / steps)
        self.rows_decoded = 0
        self.peak_batch = 0
        self._thread = threading.Thread(target=self._run, name="gptforge-serve-engine", daemon=True)

    # --- the web side -------------------------------------------------------------------------------
    def start(self) -> "Engine":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping = True
        self._inbox.put(None)
        self._thread.join(timeout=10)

    def submit(self, seqs: list[Sequence]) -> bool:
        """Queue sequences; False (nothing queued) when the queue is full."""
        with self._lock:
            if self._load + len(seqs) > self.max_batch + self.max_queue:
                return False
            self._load += len(seqs)
        now = time.monotonic()
        for s in seqs:
            s.times = [now]
            self._inbox.put(s)
        return True

    def cancel(self, seqs: list[Sequence]) -> None:
        for s in seqs:
            s.cancelled = True
        self._inbox.put(None)  # wake the thread if it sleeps

    def stats(self) -> dict:
        with self._lock:
            load = self._load
        rows = list(self.running)  # a snapshot: the model thread changes the list meanwhile
        # a sequence whose last event is out (its client may have its answer) leaves the batch after the step
        running = sum(not s.finished for s in rows)
        return {
            "running": running,
            "waiting": max(0, load - len(rows)),
            "max_batch": self.max_batch,
            "max_queue": self.max_queue,
            "steps": self.steps,
            "peak_batch": self.peak_batch,
            "mean_batch": round(self.rows_decoded / self.steps, 2) if self.steps else 0.0,
            "cancelled": self.cancelled,
            "prefix_cache": self._prefix_stats(),
        }

    def _prefix_stats(self) -> dict | None:
        p = self.prefix
        if p is None:
            return None
        return {"blocks": len(p.blocks), "bytes": p.bytes, "queries": p.queries, "hits": p.hits}

    def retry_after(self) -> int:
        """Seconds a refused client should wait: roughly how long the queue ahead takes to start."""
        with self._lock:
            ahead = max(0, self._load - self.max_batch)
        return 1 + ahead // max(1, self.max_batch)

    # --- the model thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        weights = cpu_inference_weights(self.model)
        with torch.inference_mode(), weights:
            # steps of up to 8 rows run in one C call (fastdecode.py); bigger batches through the model
            self._c_step = fastdecode.Decoder(self.model) if fastdecode.applies(self.model) else None
            while not self._stopping:
                self._intake(block=not self.running and not self.waiting)
                try:
                    self._step()
                except Exception as e:  # a bug, or out of memory: fail these requests, keep serving
                    traceback.print_exc(file=sys.stderr)
                    failed = self.running + [s for s in self._joining if s not in self.running]
                    for s in failed:
                        self._finish(s, "error", f"generation failed: {type(e).__name__}: {e}")
                    self._release(len(failed))
                    self.running, self.lens, self.logits, self._joining = [], [], None, []
                    self.cache.length = 0

    def _intake(self, block: bool) -> None:
        item = self._inbox.get() if block else None
        while True:
            if isinstance(item, Sequence):
                self.waiting.append(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
        for s in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(s)
            self._release(1)
            self.cancelled += not s.finished
        gone = [i for i, s in enumerate(self.running) if s.cancelled]
        self.cancelled += sum(not self.running[i].finished for i in gone)
        if gone:
            self._remove(gone)
            self._release(len(gone))

    def _release(self, n: int) -> None:
        with self._lock:
            self._load -= n

    def _step(self) -> None:
        self._joining = []
        budget = self.prefill_tokens
        while self.waiting and len(self.running) + len(self._joining) < self.max_batch:
            s = self.waiting[0]
            if self.prefix is not None and not s.prompt_logprobs:  # scoring needs every prompt position's logits
                s.hit = self.prefix.lookup(s.prompt, s.adapter)
            if self._joining and len(s.prompt) - (s.hit[1] if s.hit else 0) > budget:
                break
            budget -= len(s.prompt) - (s.hit[1] if s.hit else 0)
            self._joining.append(self.waiting.pop(0))
        if self._joining:
            self._prefill(self._joining)
        self._joining = []
        if not self.running:
            return
        tokens = self._sample(self.logits)
        done = [i for i, (s, t) in enumerate(zip(self.running, tokens.tolist())) if self._advance(s, t)]
        if done:
            order = self._remove(done)
            self._release(len(done))
            tokens = tokens[torch.tensor(order, dtype=torch.long, device=self.device)]
        if self.running:
            self._decode(tokens)

    @staticmethod
    def _kept_order(n: int, removed: list[int]) -> list[int]:
        """Where `_remove` moved rows: the old index now at each new row (last rows fill the holes)."""
        order = list(range(n))
        for r in sorted(removed, reverse=True):
            last = order.pop()
            if r < len(order):
                order[r] = last
        return order

    def _remove(self, rows: list[int]) -> list[int]:
        """Drop finished rows: the last row moves into each hole, so only one row is copied per leave.

        Returns the old index of each remaining row, in its new order."""
        L = self.cache.length
        order = self._kept_order(len(self.running), rows)
        for r in sorted(rows, reverse=True):
            last = len(self.running) - 1
            if r != last:
                self.cache.move_row(last, r, L)
                self.running[r], self.lens[r] = self.running[last], self.lens[last]
            self.running.pop()
            self.lens.pop()
        if self.logits is not None:
            self.logits = self.logits[torch.tensor(order, dtype=torch.long, device=self.device)] if order else None
        return order

    def _room(self, rows: int, cols: int) -> None:
        """Make the buffers hold `rows` rows and `cols` columns: drop dead leading columns, then grow."""
        c, B, L = self.cache, len(self.running), self.cache.length
        if cols > c.cols and B:
            dead = L - max(self.lens)
            if dead > 0:
                c.shift(B, dead, L, 0)
                c.length = L = L - dead
                cols -= dead
        if rows > c.rows or cols > c.cols:
            c.resize(
                max(rows, min(self.max_batch, 2 * c.rows)) if rows > c.rows else c.rows,
                max(cols, min(self.n_ctx + 1, 2 * c.cols)) if cols > c.cols else c.cols,
                B,
                L,
            )

    def _prefill(self, seqs: list[Sequence]) -> None:
        c, B = self.cache, len(self.running)
        n, P = len(seqs), max(len(s.prompt) for s in seqs)
        L = c.length if B else 0
        self._room(B + n, max(L, P) + 1)
        L = c.length if B else 0
        if P > L:  # the new prompts reach further back than the running rows: move those right
            if B:
                c.shift(B, 0, L, P - L)
            L = P
        c.real[B : B + n] = False
        # a prompt whose beginning is in the prefix cache computes only the rest: S columns for all joining rows
        S = max(len(s.prompt) - (s.hit[1] if s.hit else 0) for s in seqs)
        tokens = torch.full((n, S), self.eos, dtype=torch.long, device=self.device)
        for i, s in enumerate(seqs):
            p, q = len(s.prompt), min(S, len(s.prompt))
            tokens[i, S - q :] = torch.tensor(s.prompt[p - q :], dtype=torch.long, device=self.device)
            c.real[B + i, L - p : L] = True
            s.cached = s.hit[1] if s.hit else 0
            if p > q:  # the cached columns before the S computed ones (those are recomputed, not read)
                self.prefix.copy_into(s.hit[0], p - q, c.k, c.v, B + i, L - p)
            self._setup(s)
        mask = c.real[B : B + n, L - P : L]
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, P - S :]
        ragged = any(len(s.prompt) < P for s in seqs)
        scored = [i for i, s in enumerate(seqs) if s.prompt_logprobs]
        self._select_adapters(seqs)
        logits, _ = self.model(
            tokens,
            cache=c.window(B, B + n, L - P, P - S),
            position_ids=pos,
            attention_mask=mask if ragged else None,
            logits_to_keep=0 if scored else 1,
        )
        self._prefilled(seqs, logits, B, L)
        c.length = L
        self.running += seqs
        self.lens += [len(s.prompt) for s in seqs]
        new = logits[:, -1].float()
        self.logits = new if self.logits is None or not B else torch.cat([self.logits, new])

    def _prefilled(self, seqs: list[Sequence], logits: torch.Tensor, B: int, L: int) -> None:
        """After the prompts' pass: the prompts' own log-probabilities where asked, scoring-only requests done,
        the prompts' blocks kept in the prefix cache, the queue times measured."""
        S = logits.size(1)
        for i, s in enumerate(seqs):
            if s.prompt_logprobs:  # the prompt's own log-probabilities, from its positions' logits (all computed)
                lps, tops = prompt_logprobs(logits[i, S - len(s.prompt) :], s.prompt, s.logprobs or 0)
                s.emit(Event(s.choice, logprobs=list(zip(s.prompt, lps, tops))))
            if s.opts.max_new_tokens == 0:  # scoring only (echo with max_tokens 0): done before any token
                self._finish(s, "length")
                s.cancelled = True  # leaves at the next step, with its slot
            if self.prefix is not None:
                self.prefix.count(len(s.prompt), s.cached)
                self.prefix.store(s.prompt, s.adapter, self.cache.k, self.cache.v, B + i, L - len(s.prompt))
            if self.metrics is not None:
                self.metrics.started(s)

    def _select_adapters(self, seqs: list[Sequence]) -> None:
        """Tell the adapted layers which adapter each row of the next pass runs under."""
        if self.adapters is not None:
            self.adapters.select([s.adapter for s in seqs])

    def _setup(self, s: Sequence) -> None:
        s.row = Row(
            s.prompt,
            s.opts,
            self.eos,
            self.vocab,
            self.device,
            s.choice,
            TextStream(self.tokenizer, s.stop),
            s.logprobs,
            s.constraint.fresh(self.device)
            if s.constraint is not None
            else row_constraint(s.opts, self.tokenizer, self.vocab, self.device),
        )

    def _decode(self, tokens: torch.Tensor) -> None:
        c, B = self.cache, len(self.running)
        self._room(B, c.length + 1)
        L = c.length
        c.real[:B, L] = True
        full = all(n == L for n in self.lens)  # no padding anywhere: plain attention, no mask
        pos = torch.tensor(self.lens, dtype=torch.long, device=self.device)[:, None]
        visible = None if full else c.real[:B, : L + 1]
        self._select_adapters(self.running)
        if self._c_step is not None and self._c_step.takes(B):
            self.logits = self._c_step(tokens, pos, c.window(0, B, 0, L), visible)
        else:
            logits, _ = self.model(
                tokens[:, None], cache=c.window(0, B, 0, L), position_ids=pos, attention_mask=visible, logits_to_keep=1
            )
            self.logits = logits[:, -1].float()
        self.lens = [n + 1 for n in self.lens]
        self.steps += 1
        self.rows_decoded += B
        self.peak_batch = max(self.peak_batch, B)

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        """One token per row (generate.choose_tokens); a row whose choice fails ends alone, with an error."""

        def failed(row: Row, e: Exception) -> None:
            traceback.print_exc(file=sys.stderr)
            s = next(s for s in self.running if s.row is row)
            row.finish = "error"
            self._finish(s, "error", f"generation failed: {type(e).__name__}: {e}")

        return choose_tokens(logits, [s.row for s in self.running], on_error=failed)

    def _advance(self, s: Sequence, token: int) -> bool:
        """Give a sampled token to a sequence and send the text that became final; True when it is done."""
        row = s.row
        if s.cancelled or row.finish == "error":
            self.cancelled += s.cancelled and not s.finished  # its client left after this step's sweep (`_intake`)
            return True
        if self.metrics is not None:
            self.metrics.token(s)
        piece = row.push(token)
        if row.finish is not None:
            return self._finish(s, row.finish, text=piece)
        if piece:
            s.emit(Event(s.choice, piece, logprobs=self._new_logprobs(s)))
        return False

    def _new_logprobs(self, s: Sequence) -> list | None:
        """The log-probabilities of the tokens not yet reported (with the text they became)."""
        row = s.row
        if row is None or row.logprobs is None:
            return None
        done = s.reported
        s.reported = len(row.token_logprobs)
        return list(zip(row.ids[done : s.reported], row.token_logprobs[done:], row.top_logprobs[done:]))

    def _finish(self, s: Sequence, reason: str, error: str | None = None, text: str = "") -> bool:
        tokens = len(s.row.ids) if s.row else 0
        s.finished = True
        if self.metrics is not None:
            self.metrics.finished(s, reason)
        s.emit(Event(s.choice, text, reason, tokens, error, None if error else self._new_logprobs(s)))
        return True
