"""The memorization report's cost: building the index over the training tokens, and the report itself.

The training text is the English fortunes (2.3 MB) tokenized with a 5,000-token BPE trained on it, then, for the
100 MB row, the same documents again in other shuffled orders until the tokens of 100 MB of that text are reached
(the index's cost depends on the number of tokens, and a shuffle keeps the text from being one long repeat).
Against the suffix array (pydivsufsort), the same run builds what people write by hand instead: a Python set of
the hashes of every 16-token window (one k only, where the report gives 8, 16, 32 and 64 and the longest copy).
Peak memory is each build's own (resident set growth, measured in a fresh process per build).

    python benchmarks/bench_memorization.py [--mb 100] [--samples 100] [--tokens 256]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import cpu_name

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "fortunes_en.txt"


def tokens_for(mb: float, folder: Path) -> Path:
    from gptforge.data.vocabulary import train_tokenizer

    text = CORPUS.read_text(encoding="utf-8")
    docs = [d for d in text.split("\n\n") if d.strip()]
    tok = train_tokenizer([], vocab_size=5000, texts=[text], out_dir=folder / "tokenizer")
    ids = [np.asarray(tok.encode(d + "\n\n"), dtype=np.uint16) for d in docs]
    per_byte = sum(map(len, ids)) / len(text.encode())
    want = int(mb * 1e6 * per_byte)
    rng, parts, n = np.random.default_rng(0), [], 0
    while n < want:
        for i in rng.permutation(len(ids)):
            parts.append(ids[i])
            n += len(ids[i])
            if n >= want:
                break
    path = folder / f"tokens-{mb:g}MB.npy"
    np.save(path, np.concatenate(parts)[:want])
    return path


def build_in_child(kind: str, path: Path) -> dict:
    """Build one index in a fresh process; its time and peak memory growth."""
    code = f"""
import json, resource, time, numpy as np
tokens = np.load({str(path)!r})
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
if {kind!r} == "suffix array":
    from gptforge.memorization import SuffixIndex
    SuffixIndex.build(tokens)
else:
    windows = np.lib.stride_tricks.sliding_window_view(tokens, 16)
    seen = set(hash(w.tobytes()) for w in windows)
print(json.dumps({{"seconds": time.perf_counter() - t,
                   "peak_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def report_times(path: Path, samples: int, tokens: int) -> tuple[float, float]:
    """Seconds for the search alone (windows cut from the text itself, so they are copies) and for the whole report
    of a random `tiny` model (sampling included), against an index already built."""
    from gptforge import GPT, preset
    from gptforge.memorization import SuffixIndex, copied_shares, memorization_report
    from gptforge.options import MemorizationOptions

    data = np.load(path)
    index = SuffixIndex.build(data)
    rng = np.random.default_rng(1)
    windows = [data[s : s + tokens].astype(np.int64) for s in rng.integers(0, len(data) - tokens, size=samples)]
    t = time.perf_counter()
    copied_shares(windows, index)
    search = time.perf_counter() - t
    model = GPT(preset("tiny", vocab_size=5000)).eval()
    opts = MemorizationOptions(mem_samples=samples, mem_tokens=tokens)
    t = time.perf_counter()
    memorization_report(model, None, data, data[-200_000:], index, opts)
    return search, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=100.0)
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--tokens", type=int, default=256)
    args = ap.parse_args()
    print(f"# {cpu_name()}, {platform.machine()}, Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}")
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for mb in (2.3, args.mb):
            path = tokens_for(mb, Path(tmp))
            n = len(np.load(path, mmap_mode="r"))
            for kind in ("suffix array", "16-gram hash set"):
                r = build_in_child(kind, path)
                rows.append((f"{mb:g} MB", f"{n:,}", kind, f"{r['seconds']:.1f}", f"{r['peak_mb']:,.0f}"))
        search, whole = report_times(path, args.samples, args.tokens)
    print("| text | tokens | index | build s | peak MB |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(
        f"\nagainst the {args.mb:g} MB index, {args.samples} x {args.tokens} tokens: search {search:.2f} s; "
        f"whole report of a random tiny model (sampling included) {whole:.2f} s"
    )


if __name__ == "__main__":
    main()
