"""More model per CPU minute: a faster from-scratch recipe against the defaults, and one row per change.

`compare` runs, for each corpus, `gptforge train CORPUS --max-time Nm` once per recipe (RECIPES below,
`--recipe`; `defaults` is today's defaults, no flags), then with the former defaults spelled out as flags
(PREVIOUS: AdamW, cosine), one after the other. All train the same 5,000-token BPE on the corpus (the later
runs reuse the first one's tokenizer, so all see the same tokens and the same 90/10 document split) and all are
scored by one function on every validation token: bits per byte = total nats / ln 2 / UTF-8 bytes of the
validation text. Corpora: the English and Chinese fortunes of ../shared/corpora and 2.5 MB of the Python standard
library's source (the demo's corpus, a text the defaults were not chosen on).

`ablate` runs on one corpus: the former defaults, then each change of CHANGES in turn, added to the changes
kept so far, N minutes each (the same prepared tokens for all): a change is kept only when the validation bits
per byte fall. One row per change.

    python benchmarks/bench_recipe.py compare --minutes 10             # today's defaults against the former, 3
    corpora: about 70 minutes
    python benchmarks/bench_recipe.py compare --minutes 3 --corpus en   # one corpus
    python benchmarks/bench_recipe.py ablate --minutes 3                # fortunes_en, 3 minutes per row
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gptforge import load_model
from gptforge.data import load_meta, load_split
from gptforge.demo import stdlib_files
from gptforge.evaluate import evaluate_tokens

CORPORA = Path(__file__).resolve().parents[2] / "shared" / "corpora"

# The former from-scratch defaults (until 2026-12-01), as flags: what every change is measured against.
PREVIOUS = [
    "--optimizer",
    "adamw",
    "--schedule",
    "cosine",
    "--min-lr-ratio",
    "0.1",
    "--lr",
    "1e-3",
    "--no-zero-init",
    "--tie-embeddings",
    "--activation",
    "gelu_new",
    "--batch-size",
    "16",
    "--eval-interval",
    "200",
    "--ema",
    "0",
]

# One change each, in the order the ablation adds them: its name, and the flags that turn it on over PREVIOUS.
CHANGES = {
    "Muon (lr 0.02) for the block matrices": ["--optimizer", "muon", "--muon-lr", "0.02"],
    "warmup-stable-decay, 40% cooldown to 0": ["--schedule", "wsd", "--cooldown", "0.4", "--min-lr-ratio", "0"],
    "AdamW lr 2e-3 (embeddings, head, biases, norms)": ["--lr", "2e-3"],
    "zero-initialised output projections": ["--zero-init"],
    "untied output head": ["--no-tie-embeddings"],
    "squared-ReLU MLP": ["--activation", "relu2"],
    "batch 8 x 128 (twice the steps)": ["--batch-size", "8"],
    "evaluate every 1,000 steps, not 200": ["--eval-interval", "1000"],
    # second round: values around the kept ones
    "AdamW lr 4e-3": ["--lr", "4e-3"],
    "Muon lr 0.03": ["--muon-lr", "0.03"],
    "60% cooldown": ["--cooldown", "0.6"],
    # third round: on top of Muon + wsd alone, against the overfitting of ten minutes (7-11 passes)
    "dropout 0.1": ["--dropout", "0.1"],
    "context 256": ["--n-positions", "256"],
    "weight decay 0.3": ["--weight-decay", "0.3"],
    # fourth round: a larger model, which sees the data fewer times in the same minutes
    "6 layers x 192": ["--n-layer", "6", "--n-embd", "192", "--n-head", "6"],
    # fifth round: a moving average of the weights, for the evaluations and the saved model
    "EMA 0.995": ["--ema", "0.995"],
}

# What `compare` measures against the former defaults (docs/benchmarks.md). "first": what the first two ablation
# rounds kept (2026-11-30 morning), which overfit the Chinese fortunes; "muon-wsd": the part of it that held
# on both fortunes corpora, with the AdamW rate of the third round; "muon-wsd-ema": that with the weight average,
# today's defaults ("defaults", no flags).
RECIPES = {
    "defaults": [],
    "first": [
        "--optimizer",
        "muon",
        "--muon-lr",
        "0.02",
        "--schedule",
        "wsd",
        "--cooldown",
        "0.4",
        "--min-lr-ratio",
        "0",
        "--lr",
        "4e-3",
        "--no-tie-embeddings",
        "--eval-interval",
        "1000",
    ],
    "muon-wsd": [
        "--optimizer",
        "muon",
        "--muon-lr",
        "0.02",
        "--schedule",
        "wsd",
        "--cooldown",
        "0.4",
        "--min-lr-ratio",
        "0",
        "--lr",
        "2e-3",
    ],
}
RECIPES["muon-wsd-ema"] = [*RECIPES["muon-wsd"], *CHANGES["EMA 0.995"]]


def corpus_inputs(name: str, work: Path) -> list[str]:
    """The files of a named corpus (en, zh, stdlib) or the path given."""
    if name in ("en", "zh"):
        return [str(CORPORA / f"fortunes_{name}.txt")]
    if name == "stdlib":
        return [str(p) for p in stdlib_files(max_bytes=2_500_000)]
    return [name]


def train(out: Path, minutes: float, inputs: list[str] | None = None, flags: list[str] = ()) -> dict:
    """One `gptforge train` run; what its metrics say."""
    cmd = [
        sys.executable,
        "-m",
        "gptforge",
        "train",
        *(inputs or []),
        "--out",
        str(out),
        "--max-time",
        f"{minutes:g}m",
        "--no-progress",
        *flags,
    ]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL if inputs and len(inputs) > 3 else None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = sorted(r["tokens_per_s"] for r in rows if "tokens_per_s" in r)
    config = json.loads((out / "config.json").read_text())
    return {
        "steps": [r for r in rows if "loss" in r][-1]["step"],
        "wall": time.perf_counter() - start,
        "tokens_per_s": speeds[len(speeds) // 2],
        "load": os.getloadavg()[1],
        "shape": f"{config['n_layer']}L {config['n_embd']}d, context {config['n_positions']}",
    }


def score(model_dir: Path, data_dir: Path) -> float:
    """Bits per byte of a saved model on every validation token of `data_dir`."""
    meta = load_meta(data_dir)
    res = evaluate_tokens(
        load_model(model_dir), load_split(data_dir, "val"), batch_size=16, bytes_count=meta["val"]["bytes"]
    )
    return res.bits_per_byte


def compare(args, work: Path) -> None:
    """Per corpus: each recipe of `args.recipe`, then the former defaults, all on the first recipe's tokenizer and
    data."""
    rows = []
    for name in args.corpus:
        inputs = corpus_inputs(name, work)
        first, old = work / name / args.recipe[0], work / name / "previous"
        runs = []
        for recipe in args.recipe:
            print(f"== {name}: {recipe}", flush=True)
            out = work / name / recipe
            given = inputs if out == first else ["--tokenizer", str(first / "tokenizer"), *inputs]
            runs.append((recipe, out, train(out, args.minutes, given, RECIPES[recipe])))
        print(f"== {name}: the former defaults", flush=True)
        r_old = train(old, args.minutes, inputs, ["--tokenizer", str(first / "tokenizer"), *PREVIOUS])
        data = first / "data"
        b_old = score(old, data)
        rows.append((name, "former defaults", r_old, b_old, b_old))
        for recipe, out, r in runs:
            b = score(out, data)
            rows.append((name, recipe, r, b, b_old))
            print(f"{name}: former defaults {b_old:.4f}, {recipe} {b:.4f} ({b / b_old - 1:+.1%})", flush=True)
    print(
        f"\n{args.minutes:g} minutes each; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.machine()}\n"
    )
    print("| corpus | run | model | steps | tokens/s (median) | val bits/byte | change | load (5 min) |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name, label, r, b, b_old in rows:
        change = f"{b / b_old - 1:+.1%}" if label != "former defaults" else ""
        print(
            f"| {name} | {label} | {r['shape']} | {r['steps']:,} | {r['tokens_per_s']:,.0f} | {b:.4f} | {change} "
            f"| {r['load']:.1f} |"
        )


def ablate(args, work: Path) -> None:
    """Forward selection: each change added to the kept ones; kept if the validation bits per byte fall."""
    inputs = corpus_inputs(args.corpus[0], work)
    kept = list(args.kept or [])
    first = work / "previous"
    label = "former defaults" + "".join(f" + {k}" for k in kept)
    print(f"== {label} (and the dataset every row uses)", flush=True)
    r = train(first, args.minutes, inputs, [*PREVIOUS, *[f for k in kept for f in CHANGES[k]]])
    data = first / "data"
    best = score(first, data)
    rows = [(label, r, best, best, "-")]
    todo = {k: v for k, v in CHANGES.items() if k not in kept and (not args.only or k in args.only)}
    for i, (name, flags) in enumerate(todo.items()):
        out = work / f"change{i}"
        print(f"== + {name}", flush=True)
        r = train(
            out, args.minutes, None, ["--data", str(data), *PREVIOUS, *[f for k in kept for f in CHANGES[k]], *flags]
        )
        b = score(out, data)
        keep = b < best
        rows.append((f"+ {name}", r, b, best, "kept" if keep else "not kept"))
        if keep:
            kept.append(name)
            best = b
        print(f"{name}: {b:.4f} ({'kept' if keep else 'not kept'})", flush=True)
    print(
        f"\n{args.corpus[0]}, {args.minutes:g} minutes each; torch {torch.__version__}, {torch.get_num_threads()} "
        "threads; "
        "each row adds its change to the kept ones above it\n"
    )
    print(
        "| change | steps | tokens/s (median) | val bits/byte | against the best before it | verdict | load (5 min) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | --- | ---: |")
    for label, r, b, before, verdict in rows:
        delta = f"{b - before:+.4f}" if verdict != "-" else ""
        print(
            f"| {label} | {r['steps']:,} | {r['tokens_per_s']:,.0f} | {b:.4f} | {delta} | {verdict} | {r['load']:.1f} |"
        )
    print("\nkept: " + ", ".join(kept))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("compare", "ablate"))
    parser.add_argument("--minutes", type=float, default=10.0, help="training time of each run (default 10)")
    parser.add_argument(
        "--recipe",
        nargs="+",
        choices=tuple(RECIPES),
        default=["defaults"],
        help="compare: the flag sets measured, one run each (the first one's tokenizer serves all)",
    )
    parser.add_argument(
        "--corpus",
        nargs="+",
        default=None,
        help="en, zh, stdlib or a file (default: all three for compare, en for ablate)",
    )
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument(
        "--kept", nargs="*", choices=tuple(CHANGES), help="ablate: changes already kept (the first row has them)"
    )
    parser.add_argument("--only", nargs="*", choices=tuple(CHANGES), help="ablate: try only these changes")
    args = parser.parse_args()
    args.corpus = args.corpus or (["en", "zh", "stdlib"] if args.mode == "compare" else ["en"])
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        print(
            f"started {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        (compare if args.mode == "compare" else ablate)(args, work)


if __name__ == "__main__":
    main()
