"""LoRA against full fine-tuning: memory, speed and size on disk (gpt2-medium), and quality for the same minutes.

`memory`: `gpt2-medium` with random weights (355M parameters), one process per mode so that each peak RSS is its
own: full fine-tuning (every weight trains, AdamW state for all of them) against LoRA r=8 on every linear layer
(c_attn, c_proj, c_fc; the base frozen), each without and with activation checkpointing. Both run the same training
step as the Trainer (gptforge's network and
kernels, `configure_optimizer`, fp32, gradient clipping) on batches of 2 x 256 tokens: 1 untimed step, then
`--steps` timed ones. Reported: peak RSS (VmHWM), tokens/s, and the bytes of what each saves (the model folder's
weights; the adapter folder's).

`quality`: a base model trained from scratch on fortunes_en.txt for `--base-minutes` (`gptforge train`, every choice
left to it), then fine-tuned for `--minutes` each on one topic of fortunes_topics (train.jsonl's texts of the
topic; validation: test.jsonl's), fully and with LoRA r=8, each at its default learning rate and at one larger
one; reported: validation loss on the topic's held-out fortunes, before and after.

    python benchmarks/bench_lora.py memory                   # about 8 minutes
    python benchmarks/bench_lora.py quality --base-minutes 5 --minutes 1.5   # about 12 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CORPORA = Path(__file__).resolve().parents[2] / "shared" / "corpora"


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one_mode(mode: str, steps: int, batch: int, block: int, out: Path, checkpointing: bool = False) -> dict:
    """Training steps of gpt2-medium in this process, fully or with LoRA r=8 (with activation checkpointing or not)."""
    import torch

    from gptforge.adapters import apply_lora, save_adapter
    from gptforge.checkpoint import save_model
    from gptforge.config import preset
    from gptforge.model import GPT
    from gptforge.options import TrainConfig
    from gptforge.train.optim import configure_optimizer

    torch.manual_seed(0)
    model = GPT(preset("gpt2-medium", gradient_checkpointing=checkpointing))
    if mode == "lora":
        apply_lora(model, 8, 16.0, 0.05, "c_attn,c_proj,c_fc", base="gpt2-medium (random weights)")
    model.train()
    cfg = TrainConfig(learning_rate=2e-4 if mode == "lora" else 5e-5, weight_decay=0.01, beta2=0.999)
    opt = configure_optimizer(model, cfg, torch.device("cpu"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    g = torch.Generator().manual_seed(0)
    times = []
    for i in range(steps + 1):
        x = torch.randint(0, model.config.vocab_size, (batch, block + 1), generator=g)
        start = time.perf_counter()
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first step is a warm-up
            times.append(time.perf_counter() - start)
    peak = _peak_rss_mb()
    (save_adapter if mode == "lora" else save_model)(model, out)
    saved = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")
    return {
        "mode": mode + (" + checkpointing" if checkpointing else ""),
        "params": model.num_params(),
        "trainable": trainable,
        "peak_rss_mb": round(peak),
        "tokens_per_s": round(batch * block * len(times) / sum(times), 1),
        "saved_bytes": saved,
    }


def memory(args) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode, ckpt in (("full", False), ("lora", False), ("full", True), ("lora", True)):
            cmd = [
                sys.executable,
                __file__,
                "_one",
                mode,
                "--steps",
                str(args.steps),
                "--out",
                str(Path(tmp) / f"{mode}{ckpt}"),
            ]
            result = subprocess.run(
                cmd + (["--checkpointing"] if ckpt else []), check=True, capture_output=True, text=True
            )
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    print(
        f"\n`gpt2-medium` (random weights), batch 2 x 256 tokens, fp32, {args.steps} timed steps each; "
        f"load average at the end {os.getloadavg()[0]:.1f}\n"
    )
    print("| fine-tuning | trainable parameters | peak RSS | tokens/s | saved |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['mode']} | {r['trainable']:,} ({r['trainable'] / r['params']:.2%}) | {r['peak_rss_mb'] / 1024:.2f} "
            "GiB | "
            f"{r['tokens_per_s']:.0f} | {r['saved_bytes'] / 1e6:,.1f} MB |"
        )
    for full, lora in (rows[0:2], rows[2:4]):
        print(
            f"\n{lora['mode']} / {full['mode']}: peak RSS {lora['peak_rss_mb'] / full['peak_rss_mb']:.2f}x, tokens/s "
            f"{lora['tokens_per_s'] / full['tokens_per_s']:.2f}x, saved {lora['saved_bytes'] / full['saved_bytes']:.2%}"
        )


def _topic_files(topic: str, root: Path) -> tuple[Path, Path]:
    """The fortunes of one topic as blank-line separated text: train.jsonl's and test.jsonl's."""
    out = []
    for split in ("train", "test"):
        rows = [json.loads(line) for line in (CORPORA / "fortunes_topics" / f"{split}.jsonl").read_text().splitlines()]
        path = root / f"{topic}_{split}.txt"
        path.write_text("\n\n".join(r["text"].strip() for r in rows if r["label"] == topic) + "\n")
        out.append(path)
    return out[0], out[1]


def _gptforge(*argv: str) -> None:
    cmd = [sys.executable, "-m", "gptforge", *argv]
    print("$ gptforge " + " ".join(argv), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def _val_loss(model: str, text: Path, adapter: str | None = None) -> float:
    out = subprocess.run(
        [sys.executable, "-m", "gptforge", "eval", model, str(text), "--json"]
        + (["--adapter", adapter] if adapter else []),
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out)[str(text)]["loss"]


def quality(args) -> None:
    root = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_lora_"))
    root.mkdir(parents=True, exist_ok=True)
    base = root / "base"
    if not (base / "model.safetensors").is_file():
        _gptforge(
            "train",
            str(CORPORA / "fortunes_en.txt"),
            "--out",
            str(base),
            "--max-time",
            f"{args.base_minutes:g}m",
            "--no-progress",
            "--overwrite",
        )
    train, val = _topic_files(args.topic, root)
    rows = [("base model, not fine-tuned", "-", _val_loss(str(base), val))]
    runs = [("full", None), ("full", "3e-4"), ("LoRA r=8", None), ("LoRA r=8", "1e-3")]
    for name, lr in runs:
        out = root / f"{name.split()[0].lower()}-{lr or 'default'}"
        extra = (["--lora-r", "8"] if name.startswith("LoRA") else []) + (["--lr", lr] if lr else [])
        _gptforge(
            "train",
            "--init",
            str(base),
            str(train),
            "--eval-file",
            str(val),
            "--max-time",
            f"{args.minutes:g}m",
            "--out",
            str(out),
            "--no-progress",
            "--overwrite",
            "--eval-interval",
            "0",
            *extra,
        )
        shown = lr or ("2e-4 (default)" if name.startswith("LoRA") else "5e-5 (default)")
        rows.append((name, shown, _val_loss(str(out), val)))
    config = json.loads((base / "config.json").read_text())
    print(
        f"\nbase: {config['n_layer']}L {config['n_embd']}d, {args.base_minutes:g} min on fortunes_en.txt; fine-tuning: "
        f"{args.minutes:g} min each on topic {args.topic!r} ({train.stat().st_size:,} bytes), validation on its "
        f"{val.stat().st_size:,} held-out bytes; load average {os.getloadavg()[0]:.1f}\n"
    )
    print("| model | learning rate | validation loss (topic) |")
    print("| --- | --- | ---: |")
    for name, lr, loss in rows:
        print(f"| {name} | {lr} | {loss:.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("memory")
    p.add_argument("--steps", type=int, default=2)
    p = sub.add_parser("_one")
    p.add_argument("mode", choices=("full", "lora"))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--checkpointing", action="store_true")
    p = sub.add_parser("quality")
    p.add_argument("--base-minutes", type=float, default=10.0)
    p.add_argument("--minutes", type=float, default=2.0)
    p.add_argument("--topic", default="computers")
    p.add_argument("--work-dir", type=Path)
    args = parser.parse_args()
    if args.what == "_one":
        print(json.dumps(one_mode(args.mode, args.steps, 2, 256, args.out, args.checkpointing)))
    else:
        (memory if args.what == "memory" else quality)(args)


if __name__ == "__main__":
    main()
