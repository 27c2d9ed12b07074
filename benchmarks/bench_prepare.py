"""Data preparation: `gptforge prepare` against the `tokenizers` library's encode_batch, same tokenizer, same run.

    python benchmarks/bench_prepare.py [--size-mb 100] [--trials 3] [--workers 2]
    python benchmarks/bench_prepare.py --scaling [--size-mb 50] [--trials 3]

Builds a corpus of at least --size-mb MB from ../shared/corpora (English and Chinese fortunes, repeated),
trains a 5,000-token byte-level BPE on it, then alternates trials of
  * gptforge: `prepare(corpus, tokenizer, out, val_fraction=0)` (streaming, worker processes, tiktoken path)
  * tokenizers: the same documents streamed in ~1 MB batches through `Tokenizer.encode_batch` (its own
    thread pool uses every core), ids appended to a uint16 file in the same layout
each in a fresh process, and reports median MB/s, peak memory (PSS) of the whole process tree, and whether the two
token files are byte-identical. Prints a markdown table.

With --scaling, the corpus is 8 files and gptforge alone runs, in interleaved trials: `prepare` with 1 worker
process, with 2, and as 2 parts (`part="1/2"` and `"2/2"`, one worker each, run at the same time, as two
machines would); it reports tokens per second in all and per core busy (the processes that encode, at most
the cores), the figure a cluster estimate multiplies.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CORPORA = Path(os.environ.get("GPTFORGE_CORPORA") or Path(__file__).resolve().parents[1] / ".." / "shared" / "corpora")


def build_corpus(path: Path, size_mb: float) -> None:
    parts = [(CORPORA / name).read_text(encoding="utf-8") for name in ("fortunes_en.txt", "fortunes_zh.txt")]
    block = "\n\n".join(p.strip("\n") for p in parts) + "\n\n"
    with open(path, "w", encoding="utf-8") as f:
        written = 0
        while written < size_mb * 1e6:
            f.write(block)
            written += len(block.encode())


def tree_rss(pid: int) -> int:
    """Proportional resident bytes (PSS) of `pid` and all its descendants (Linux /proc).

    PSS splits pages shared between a parent and its forked workers among them, so the sum is the memory
    the process tree really holds (summing RSS would count shared pages once per process).
    """
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            for line in open(f"/proc/{p}/smaps_rollup"):
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
        stack += children.get(p, [])
    return total


def run_measured(args: list[str]) -> tuple[dict, int]:
    """Run a child process, sampling the RSS of its process tree; returns its JSON result and the peak."""
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)
    peak, done = 0, threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(0.02)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, _ = proc.communicate()
    done.set()
    t.join()
    if proc.returncode:
        raise SystemExit(f"child {args} failed")
    return json.loads(out.strip().splitlines()[-1]), peak


def child_parts(corpus: str, tok_dir: str, out: str, count: str) -> dict:
    """`count` parts of `corpus`, each in its own process with one worker, all at once; then the joined dataset."""
    from gptforge.data import load_meta

    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--child", "part", corpus, tok_dir, out, f"{i}/{count}"],
            stdout=subprocess.DEVNULL,
        )
        for i in range(1, int(count) + 1)
    ]
    if any(p.wait() for p in procs):
        raise SystemExit("a part failed")
    meta = load_meta(out)
    return {"seconds": time.perf_counter() - t0, "tokens": meta["train"]["tokens"], "workers": int(count)}


def child_part(corpus: str, tok_dir: str, out: str, part: str) -> dict:
    from gptforge.data import prepare

    prepare(corpus, tok_dir, out, val_fraction=0.0, workers=1, force=True, part=part)
    return {}


def scaling(args, tmp: Path) -> None:
    """Tokens per second of prepare with 1 and 2 worker processes, and as 2 parts run side by side."""
    corpus = tmp / "corpus"
    corpus.mkdir()
    for k in range(8):
        build_corpus(corpus / f"part{k}.txt", args.size_mb / 8)
    mb = sum(f.stat().st_size for f in corpus.iterdir()) / 1e6
    from gptforge.data.vocabulary import train_tokenizer

    train_tokenizer([CORPORA / "fortunes_en.txt", CORPORA / "fortunes_zh.txt"], vocab_size=5000, out_dir=tmp / "tok")
    kinds = {
        "prepare, 1 worker": ["gptforge", str(corpus), str(tmp / "tok"), str(tmp / "w1"), "1"],
        "prepare, 2 workers": ["gptforge", str(corpus), str(tmp / "tok"), str(tmp / "w2"), "2"],
        "2 parts side by side, 1 worker each": ["parts", str(corpus), str(tmp / "tok"), str(tmp / "p2"), "2"],
    }
    rows: dict[str, list] = {k: [] for k in kinds}
    for trial in range(args.trials):
        for name, child in kinds.items():
            if child[0] == "parts":
                shutil.rmtree(child[3], ignore_errors=True)
            r, peak = run_measured(["--child", *child])
            rows[name].append((r["tokens"] / r["seconds"], r["seconds"], peak, r["workers"]))
        said = ", ".join(f"{k} {v[-1][0]:,.0f} tok/s" for k, v in rows.items())
        print(f"trial {trial + 1}: {said}", file=sys.stderr)
    cores = os.cpu_count() or 1
    print(f"\ncorpus: {mb:.0f} MB in 8 files ({r['tokens']:,} tokens), {cores} CPUs, median of {args.trials} trials\n")
    print("| run | seconds | tokens/s | tokens/s per core busy | peak memory, PSS (MB) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, values in rows.items():
        speed = statistics.median(v[0] for v in values)
        busy = min(values[0][3], cores)
        seconds = statistics.median(v[1] for v in values)
        peak = max(v[2] for v in values) / 1e6
        print(f"| {name} | {seconds:.1f} | {speed:,.0f} | {speed / busy:,.0f} | {peak:.0f} |")


# --- the two contenders, each run in its own process -------------------------------------------------------


def child_gptforge(corpus: str, tok_dir: str, out: str, workers: int) -> dict:
    from gptforge.data import prepare
    from gptforge.tokenizer import load_tokenizer

    t0 = time.perf_counter()
    meta = prepare(corpus, load_tokenizer(tok_dir), out, val_fraction=0.0, workers=workers, force=True)
    seconds = time.perf_counter() - t0
    sha = hashlib.sha256()  # streamed from the shard files, so hashing adds nothing to the peak memory
    for shard in meta["train"]["shards"]:
        with open(Path(out) / shard["file"], "rb") as f:
            while block := f.read(1 << 20):
                sha.update(block)
    return {
        "seconds": seconds,
        "tokens": meta["train"]["tokens"],
        "sha": sha.hexdigest(),
        "fast_path": load_tokenizer(tok_dir).fast_path,
        "workers": meta["workers"],
    }


def child_tokenizers(corpus: str, tok_dir: str, out: str) -> dict:
    import numpy as np
    from tokenizers import Tokenizer

    from gptforge.data import ReadOptions, iter_pieces

    t0 = time.perf_counter()
    hf = Tokenizer.from_file(str(Path(tok_dir) / "tokenizer.json"))
    eos = hf.token_to_id("<|endoftext|>")
    sha, n = hashlib.sha256(), 0
    with open(out, "wb") as f:

        def flush(docs):
            nonlocal n
            ids = []
            for enc in hf.encode_batch(docs, add_special_tokens=False):
                ids += enc.ids
                ids.append(eos)
            arr = np.asarray(ids, dtype=np.uint16)
            f.write(arr.tobytes())
            sha.update(arr.tobytes())
            n += len(arr)

        head = np.asarray([eos], dtype=np.uint16)
        f.write(head.tobytes())
        sha.update(head.tobytes())
        n += 1
        for texts, _ in iter_pieces([Path(corpus)], ReadOptions()):  # ~1 MB of documents at a time
            flush(texts)
    return {"seconds": time.perf_counter() - t0, "tokens": n, "sha": sha.hexdigest()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=float, default=100)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--skip-reference", action="store_true", help="measure gptforge only (memory at large sizes)")
    ap.add_argument("--scaling", action="store_true", help="1 and 2 worker processes, and 2 parts side by side")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind in ("parts", "part"):
            result = (child_parts if kind == "parts" else child_part)(*rest)
        else:
            result = child_gptforge(*rest[:3], int(rest[3])) if kind == "gptforge" else child_tokenizers(*rest)
        print(json.dumps(result))
        return

    from gptforge.data.vocabulary import train_tokenizer

    if args.scaling:
        with tempfile.TemporaryDirectory() as tmp:
            scaling(args, Path(tmp))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus.txt"
        build_corpus(corpus, args.size_mb)
        mb = corpus.stat().st_size / 1e6
        tok = train_tokenizer(
            [CORPORA / "fortunes_en.txt", CORPORA / "fortunes_zh.txt"], vocab_size=5000, out_dir=tmp / "tok"
        )
        rows: dict[str, list] = {"gptforge prepare": [], "tokenizers encode_batch": []}
        results = {}
        for trial in range(args.trials):  # interleaved, so load from other jobs hits both alike
            r, peak = run_measured(
                ["--child", "gptforge", str(corpus), str(tmp / "tok"), str(tmp / "ds"), str(args.workers)]
            )
            rows["gptforge prepare"].append((mb / r["seconds"], peak))
            results["gptforge prepare"] = r
            if args.skip_reference:
                continue
            r, peak = run_measured(["--child", "tokenizers", str(corpus), str(tmp / "tok"), str(tmp / "ref.bin")])
            rows["tokenizers encode_batch"].append((mb / r["seconds"], peak))
            results["tokenizers encode_batch"] = r
            print(
                f"trial {trial + 1}: " + ", ".join(f"{k} {v[-1][0]:.1f} MB/s" for k, v in rows.items()), file=sys.stderr
            )
        ours, ref = results["gptforge prepare"], results.get("tokenizers encode_batch")
        same = ref is not None and ours["sha"] == ref["sha"] and ours["tokens"] == ref["tokens"]
        rows = {k: v for k, v in rows.items() if v}
        base = rows.get("tokenizers encode_batch", rows["gptforge prepare"])
        cpu = next(
            (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
            platform.processor(),
        )
        print(
            f"\ncorpus: {mb:.0f} MB ({ours['tokens']:,} tokens), byte-level BPE of {tok.vocab_size} tokens, "
            f"{os.cpu_count()} CPUs ({cpu}), gptforge workers: {ours['workers']}, fast path: {ours['fast_path']}, "
            f"median of {args.trials} interleaved trials\n"
        )
        print("| pipeline | MB/s | speed-up | peak memory, PSS (MB) | identical ids |")
        print("| --- | ---: | ---: | ---: | --- |")
        for name, values in rows.items():
            speed = statistics.median(s for s, _ in values)
            ratio = statistics.median(s / b for (s, _), (b, _) in zip(values, base))  # paired by trial
            rss = max(p for _, p in values) / 1e6
            check = "yes" if same else "NO" if ref is not None else "not checked"
            print(f"| {name} | {speed:.1f} | {ratio:.2f}x | {rss:.0f} | {check} |")


if __name__ == "__main__":
    main()
