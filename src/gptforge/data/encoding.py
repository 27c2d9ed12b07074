"""Encoding jobs of `prepare`, run in worker processes: clean and encode ~1 MB of documents at a time, with at
most two jobs per worker in flight (bounded memory); workers end with the process that started them."""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from collections import deque

import numpy as np

from ..tokenizer import EOS, Tokenizer
from .reading import ReadOptions, clean

_worker: dict = {}


def _end_with_parent(parent: int, watch: bool = False) -> None:
    """End this worker when `parent` dies, even by kill -9: an orphan waits for jobs for good, holding the command's
    stdout (`prepare ... | tee log` never ends). Linux signals it at once; elsewhere a thread (`watch`) looks."""
    if watch:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)
    try:
        import ctypes

        signalled = sys.platform.startswith("linux") and ctypes.CDLL(None).prctl(1, 9) == 0  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        signalled = False
    if not signalled:
        threading.Thread(target=_end_with_parent, args=(parent, True), daemon=True).start()
    elif os.getppid() != parent:  # it died before the signal was asked for
        os._exit(1)


def _init_worker(tokenizer: Tokenizer, opts: ReadOptions, dtype: str, parent: int | None = None) -> None:
    if parent is not None:
        _end_with_parent(parent)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already; no nested thread pools
    _worker.update(tokenizer=tokenizer, opts=opts, dtype=np.dtype(dtype))


def _encode_job(texts: list[str], ends: list[bool]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Clean and encode one job: (tokens with <|endoftext|> after each finished document, tokens per text
    including that separator, UTF-8 bytes per text, 64-bit hash per text or None)."""
    tok: Tokenizer = _worker["tokenizer"]
    opts: ReadOptions = _worker["opts"]
    if opts.nfc or opts.drop_control or opts.remove:
        texts = [clean(t, opts) for t in texts]
    finished = np.asarray(ends, dtype=bool)
    if any(EOS in t for t in texts):  # a literal <|endoftext|> in the text: encode texts one by one
        arrays = [np.append(tok.encode_array(t), [tok.eos_id] * e) for t, e in zip(texts, ends)]
        ids = np.concatenate(arrays)
        counts = np.array([len(a) for a in arrays], dtype=np.int64)
    else:  # one call for the whole job; the separators tell the texts apart again
        ids = tok.encode_array(EOS.join(texts) + EOS)
        cuts = np.flatnonzero(ids == tok.eos_id)
        counts = np.diff(cuts, prepend=-1)
        ids = np.delete(ids, cuts[~finished])  # a piece that the next text continues gets no separator
        counts[~finished] -= 1
    nbytes = np.array([len(t.encode("utf-8", "surrogatepass")) for t in texts], dtype=np.int64)
    hashes = None
    if opts.dedupe:
        hashes = np.array(
            [
                int.from_bytes(hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
                for t in texts
            ],
            dtype=np.uint64,
        )
    return ids.astype(_worker["dtype"]), counts, nbytes, hashes


def run_jobs(jobs, tokenizer: Tokenizer, opts: ReadOptions, dtype: str, workers: int):
    """(job, result of `_encode_job`) in input order, with at most 2 jobs per worker in flight (bounded memory)."""
    if workers <= 1:
        _init_worker(tokenizer, opts, dtype)
        for job in jobs:
            yield job, _encode_job(job[0], job[1])
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # fork: workers start in milliseconds and a user's script needs no `if __name__ == "__main__"` guard
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(
        workers,
        mp_context=mp.get_context(method),
        initializer=_init_worker,
        initargs=(tokenizer, opts, dtype, os.getpid()),
    ) as pool:
        window: deque = deque()
        try:
            for job in jobs:
                window.append((job, pool.submit(_encode_job, job[0], job[1])))
                if len(window) >= 2 * workers:
                    job, fut = window.popleft()
                    yield job, fut.result()
            while window:
                job, fut = window.popleft()
                yield job, fut.result()
        finally:
            for _, fut in window:
                fut.cancel()


__all__ = ["run_jobs"]
