"""Training batches: windows of a token array as a pure function of the step, and a background prefetcher."""

from __future__ import annotations

import queue
import threading

import numpy as np

from ..errors import DataError


class Batches:
    """Training batches drawn from a token array; `batch(step)` is a pure function of (seed, step, rank, world_size).

    * mode="random": nanoGPT-style windows of block_size + 1 tokens at random offsets.
    * mode="sequential": epochs over windows starting every `stride` tokens (default block_size, i.e. no
      overlap; block_size // 2 makes text across a window edge be learned in full context as well). Each
      epoch visits every window once in a seeded shuffled order (`shuffle=False`: in order); a global batch
      of batch_size * world_size windows is cut into one slice per rank, so ranks never share windows.

    Nothing depends on earlier calls, so a resumed run asks for step N and gets exactly the batch it would
    have had, and each rank of a distributed run draws its own share without communication.
    """

    def __init__(
        self,
        tokens,
        block_size: int,
        batch_size: int,
        *,
        mode: str = "random",
        stride: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ):
        if mode not in ("random", "sequential"):
            raise DataError(f"mode={mode!r}: choose 'random' or 'sequential'")
        if block_size < 1 or batch_size < 1:
            raise DataError(f"block_size={block_size} and batch_size={batch_size} must be positive")
        if not 0 <= rank < world_size:
            raise DataError(f"rank={rank} must be in [0, world_size={world_size})")
        n = len(tokens)
        if n < block_size + 1:
            hint = 1 << max(0, (n - 2).bit_length() - 1) if n > 2 else 0
            raise DataError(
                f"the text has {n} tokens, fewer than one block of block_size + 1 = {block_size + 1}; "
                + (
                    f"use a block size of at most {n - 1} (e.g. --block-size {hint}) or add text"
                    if hint
                    else "add more text"
                )
            )
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.mode, self.seed, self.rank, self.world_size, self.shuffle = mode, seed, rank, world_size, shuffle
        self.stride = stride or block_size
        if self.stride < 1:
            raise DataError(f"stride={stride} must be positive")
        self.num_windows = (n - block_size - 1) // self.stride + 1
        self.steps_per_epoch = self.num_windows // (batch_size * world_size)
        if mode == "sequential" and self.steps_per_epoch == 0:
            raise DataError(
                f"the text has {self.num_windows} windows of {block_size} tokens, fewer than one batch of "
                f"batch_size * world_size = {batch_size * world_size}; lower --batch-size or --block-size"
            )
        self._perm: tuple[int, np.ndarray] | None = None

    def starts(self, step: int) -> np.ndarray:
        """Window start offsets of this rank's batch at `step`."""
        if self.mode == "random":
            # One global batch per step, cut into rank slices: N ranks of batch B see exactly what one
            # process of batch N*B sees, so runs and checkpoints move between world sizes unchanged.
            rng = np.random.default_rng([self.seed, step])
            starts = rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size * self.world_size)
            return starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        epoch, i = divmod(step, self.steps_per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            order = (
                np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
                if self.shuffle
                else np.arange(self.num_windows)
            )
            self._perm = (epoch, order)
        first = (i * self.world_size + self.rank) * self.batch_size
        return self._perm[1][first : first + self.batch_size] * self.stride

    def batch(self, step: int):
        """(x, y) int64 tensors of shape (batch_size, block_size); y is x shifted by one token."""
        import torch

        rows = np.stack([np.asarray(self.tokens[s : s + self.block_size + 1]) for s in self.starts(step)]).astype(
            np.int64
        )
        data = torch.from_numpy(rows)
        return data[:, :-1], data[:, 1:]

    def epoch(self, step: int) -> float:
        """Fraction of passes over the data done before `step` (sequential mode counts whole windows)."""
        return step / self.steps_per_epoch if self.steps_per_epoch else 0.0


class Prefetcher:
    """Yields batches for steps start, start+1, ... from a background thread, already on `device`.

    On CUDA the batch is pinned and copied with non_blocking=True, so the copy overlaps the previous step.
    `depth` bounds how many batches wait in memory. Errors in the thread are raised in the consumer.
    """

    _DONE = object()

    def __init__(self, batches: Batches, start_step: int, device, depth: int = 4, stop_step: int | None = None):
        import torch

        self.batches, self.step, self.stop_step = batches, start_step, stop_step
        self.device = torch.device(device)
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gptforge-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        step = self.step
        try:
            while not self._stop.is_set() and (self.stop_step is None or step < self.stop_step):
                batch = self.batches.batch(step)  # a tuple of tensors: (x, y) for language modelling
                if self.device.type == "cuda":
                    batch = tuple(t.pin_memory().to(self.device, non_blocking=True) for t in batch)
                elif self.device.type != "cpu":
                    batch = tuple(t.to(self.device) for t in batch)
                self._put(batch)
                step += 1
            self._put(self._DONE)
        except BaseException as e:  # handed to the consumer
            self._put(e)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self):
        return self

    def __next__(self):
        item = self._queue.get()
        if item is self._DONE:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        self.step += 1
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


__all__ = ["Batches", "Prefetcher"]
