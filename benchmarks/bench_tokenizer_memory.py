"""Peak memory of BPE tokenizer training on one long line: whole documents handed to the trainer (the
reference, as before) vs pieces of at most 1M characters cut where the words cannot change (gptforge now).

    flock /tmp/gptforge-bench.lock python benchmarks/bench_tokenizer_memory.py --mb 50

Each mode runs in a fresh process; peak memory is that process's maximum resident set size.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_line(path: Path, mb: int) -> None:
    """`mb` megabytes of English-like words on a single line (no line breaks at all)."""
    rng = random.Random(0)
    words = ["".join(rng.choice("etaoinshrdlucmfwypvbgkjqxz") for _ in range(rng.randint(1, 9))) for _ in range(30_000)]
    with open(path, "w", encoding="utf-8") as f:
        written = 0
        while written < mb * 1_000_000:
            chunk = " ".join(rng.choice(words) for _ in range(20_000)) + ". "
            f.write(chunk)
            written += len(chunk)


def run_one(path: str, mode: str) -> dict:
    import gptforge.data.reading as reading
    from gptforge.data.vocabulary import train_tokenizer

    if mode == "whole":
        reading.split_long = lambda text, *a: iter([text])  # the reference: each document as one string
    start = time.perf_counter()
    tok = train_tokenizer([path], vocab_size=5000, out_dir=None)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    return {
        "mode": mode,
        "seconds": seconds,
        "peak_bytes": peak,
        "vocab": tok.vocab_size,
        "fingerprint": tok.fingerprint,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=50)
    ap.add_argument("--one", nargs=2, metavar=("PATH", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(*args.one)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "line.txt"
        make_line(path, args.mb)
        rows = []
        for mode in ("whole", "pieces"):
            out = subprocess.run(
                [sys.executable, __file__, "--one", str(path), mode], capture_output=True, text=True, check=True
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"BPE tokenizer training, vocab 5000, one line of {args.mb} MB")
    print("| mode | peak memory | time | same vocabulary |")
    print("| --- | ---: | ---: | --- |")
    for r in rows:
        same = "yes" if r["fingerprint"] == rows[0]["fingerprint"] else "no"
        print(f"| {r['mode']} | {r['peak_bytes'] / 2**30:.2f} GiB | {r['seconds']:.1f} s | {same} |")
    print(f"peak memory ratio whole/pieces: {rows[0]['peak_bytes'] / rows[1]['peak_bytes']:.1f}x")


if __name__ == "__main__":
    main()
