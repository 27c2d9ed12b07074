"""Time to quality: validation bits per byte after N minutes of training, gptforge against a plain transformers loop.

gptforge runs as a user would run it: `gptforge train CORPUS --out DIR --max-time Nm` with every other choice
left to it (it trains a 5,000-token BPE tokenizer, splits the documents 90/10, picks the model size for the
data and the time, and lays its learning-rate schedule over the N minutes). The reference then gets the
same N minutes of training, with the same tokenizer and the same train/validation tokens (the ones gptforge
prepared), in a plain transformers loop with fixed hyperparameters (REFERENCE below): AdamW, warmup then a
constant learning rate (a loop that stops at a deadline does not know its step count, so it cannot decay to
the end), gradient clipping at 1.0, batch 16. The loop trains two models, one after the other, each for the
N minutes: the older GPT-2 tools' guide model (8 layers x 256 wide x 8 heads, context 256, dropout 0.1, what
a user who follows that guide trains) and a copy of the shape gptforge chose (same layers, width, heads,
context and dropout), which separates what gptforge's size choice gives from what its training gives.

Both final models are scored by the same function on every validation token:
bits per byte = total nats / ln 2 / UTF-8 bytes of the validation text. The runs are one after the other
(gptforge first, as it prepares the data), so load from other jobs on the machine can favour either; the
table shows the load average at the end of each.

    python benchmarks/bench_quality.py                       # 10 minutes each (3 runs: about 35 minutes)
    python benchmarks/bench_quality.py --minutes 0.5         # a quick end-to-end check
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

from gptforge import load_model
from gptforge.data import Batches, load_meta, load_split
from gptforge.evaluate import evaluate_tokens
from gptforge.tokenizer import load_tokenizer

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "fortunes_en.txt"
REFERENCE = dict(batch=16, lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, warmup_steps=100, grad_clip=1.0, seed=1337)
GUIDE_SHAPE = dict(n_layer=8, n_embd=256, n_head=8, block=256, dropout=0.1)


def run_gptforge(corpus: Path, out: Path, minutes: float) -> dict:
    """The `gptforge train` command with default choices; returns what it reported and how long it took."""
    cmd = [
        sys.executable,
        "-m",
        "gptforge",
        "train",
        str(corpus),
        "--out",
        str(out),
        "--max-time",
        f"{minutes:g}m",
        "--no-progress",
    ]
    print("$ " + " ".join(cmd[2:]), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last_train = [r for r in rows if "loss" in r][-1]
    last_val = [r for r in rows if "val_loss" in r][-1]
    config = json.loads((out / "config.json").read_text())
    return {
        "steps": last_train["step"],
        "train_seconds": last_val["elapsed"],
        "wall": wall,
        "reported_bpb": last_val["val_bits_per_byte"],
        "shape": f"{config['n_layer']}L {config['n_embd']}d {config['n_head']}h, context {config['n_positions']}",
    }


def chosen_shape(run_dir: Path) -> dict:
    """The shape of the model gptforge trained, from its config.json."""
    c = json.loads((run_dir / "config.json").read_text())
    return dict(
        n_layer=c["n_layer"], n_embd=c["n_embd"], n_head=c["n_head"], block=c["n_positions"], dropout=c["resid_pdrop"]
    )


def run_reference(data_dir: Path, shape: dict, vocab_size: int, eos_id: int, seconds: float, out: Path) -> dict:
    """A plain transformers training loop that stops at the deadline; saves the model to `out`."""
    r = {**REFERENCE, **shape}
    torch.manual_seed(r["seed"])
    config = transformers.GPT2Config(
        vocab_size=vocab_size,
        n_positions=r["block"],
        n_embd=r["n_embd"],
        n_layer=r["n_layer"],
        n_head=r["n_head"],
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        resid_pdrop=r["dropout"],
        embd_pdrop=r["dropout"],
        attn_pdrop=r["dropout"],
    )
    model = transformers.GPT2LMHeadModel(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], betas=r["betas"], weight_decay=r["weight_decay"])
    batches = Batches(load_split(data_dir, "train"), r["block"], r["batch"], seed=r["seed"])
    print(
        f"reference: GPT2LMHeadModel {model.num_parameters() / 1e6:.2f}M parameters ({shape}), {seconds:.0f}s",
        flush=True,
    )
    start, step = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        for group in opt.param_groups:
            group["lr"] = r["lr"] * min(1.0, (step + 1) / r["warmup_steps"])
        x, _ = batches.batch(step)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), r["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % 100 == 0:
            print(f"reference step {step}: loss {loss.item():.3f}, {time.perf_counter() - start:.0f}s", flush=True)
    train_seconds = time.perf_counter() - start
    model.save_pretrained(out)
    return {
        "steps": step,
        "train_seconds": train_seconds,
        "wall": train_seconds,
        "reported_bpb": None,
        "shape": f"{r['n_layer']}L {r['n_embd']}d {r['n_head']}h, context {r['block']}",
    }


def score(model_dir: Path, data_dir: Path) -> float:
    """Bits per byte of a saved model on every validation token (non-overlapping windows of its context)."""
    meta = load_meta(data_dir)
    res = evaluate_tokens(
        load_model(model_dir), load_split(data_dir, "val"), batch_size=16, bytes_count=meta["val"]["bytes"]
    )
    return res.bits_per_byte


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="training time for each of the two (default 10)")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument(
        "--reference",
        choices=("both", "guide", "chosen"),
        default="both",
        help="which reference models the loop trains (default both: guide model and gptforge's shape)",
    )
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    if not args.corpus.is_file():
        parser.error(f"--corpus {args.corpus}: no such file")
    if args.minutes <= 0:
        parser.error(f"--minutes must be positive, got {args.minutes}")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        run_dir, ref_dir = work / "gptforge", work / "reference"
        print(
            f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
            f"{platform.machine()}, load average {os.getloadavg()[0]:.1f}; {args.minutes:g} minutes each",
            flush=True,
        )
        results, loads = {}, {}
        results["gptforge"] = run_gptforge(args.corpus, run_dir, args.minutes)
        loads["gptforge"] = os.getloadavg()[1]
        # the reference uses the tokenizer and the train/validation tokens that gptforge just prepared
        tok = load_tokenizer(run_dir / "tokenizer")
        data_dir = run_dir / "data"
        shapes = {
            "transformers loop, guide model": GUIDE_SHAPE,
            "transformers loop, gptforge's shape": chosen_shape(run_dir),
        }
        if args.reference != "both":
            shapes = dict([list(shapes.items())[args.reference == "chosen"]])
        bpb = {"gptforge": score(run_dir, data_dir)}
        for i, (label, shape) in enumerate(shapes.items()):
            folder = ref_dir / str(i)
            results[label] = run_reference(data_dir, shape, tok.vocab_size, tok.eos_id, args.minutes * 60, folder)
            loads[label] = os.getloadavg()[1]
            bpb[label] = score(folder, data_dir)
        meta = load_meta(data_dir)

    print(
        f"\nvalidation: {meta['val']['tokens']:,} tokens, {meta['val']['bytes']:,} bytes of "
        f"{args.corpus.name} (90/10 document split, seed 1337)\n"
    )
    print("| implementation | model | optimizer steps | training time | val bits/byte | load average (5 min) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, r in results.items():
        note = f" (its own report: {r['reported_bpb']:.4f})" if r["reported_bpb"] is not None else ""
        print(
            f"| {label} | {r['shape']} | {r['steps']:,} | {r['train_seconds']:.0f}s | {bpb[label]:.4f}{note} "
            f"| {loads[label]:.1f} |"
        )
    print()
    for label in shapes:
        gain = bpb[label] - bpb["gptforge"]
        print(f"gptforge - {label}: {-gain:+.4f} bits/byte ({'better' if gain > 0 else 'worse'})")
    print(f"gptforge command wall time {results['gptforge']['wall']:.0f}s (tokenizer and data preparation included)")
    assert all(math.isfinite(v) for v in bpb.values())


if __name__ == "__main__":
    main()
