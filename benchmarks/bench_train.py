"""Training throughput: `gptforge.train.train` against a plain transformers loop and the transformers Trainer.

All three train the same GPT-2 (same config, same initial weights, dropout 0 as in bench_step.py) on the same
batches (gptforge's `Batches` over one prepared dataset), with AdamW at the same lr / betas / weight decay and
gradient clipping at 1.0, in fp32 on the CPU:

* gptforge: the real engine, `gptforge.train.train(...)` for W + M optimizer steps, log interval 1;
  tokens/s is read from its metrics (the rows of the last M steps).
* transformers loop: `GPT2LMHeadModel` with `torch.optim.AdamW` at its defaults (what a hand-written loop
  gets), `clip_grad_norm_`, one batch per step.
* transformers Trainer: `Trainer` with `TrainingArguments` (its default optimizer, cosine schedule,
  sequential sampler over the same batches); tokens/s from a callback's step-end times.

Each trial runs all three once (the order rotating, so load from other jobs hits them alike) from fresh
copies of the weights; the first W steps of every run are warm-up and not timed. The table shows medians
over trials, ratios, and achieved GFLOP/s as a share of the fp32 matmul peak measured at the start
(FLOPs per token as in bench_step.py). The text is only there to give real token ids: its tokenizer has
5,000 tokens, which the gpt2 shape (vocabulary 50,257) uses as a subset.

    python benchmarks/bench_train.py                           # both shapes
    python benchmarks/bench_train.py --shapes small --trials 5 --steps 10
"""
from __future__ import annotations

import argparse
import copy
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers

from bench_step import SHAPES, build, flops_per_token, matmul_peak_gflops  # same models, FLOP count and peak

from gptforge.data import Batches, load_split, prepare
from gptforge.tokenizer import train_tokenizer
from gptforge.train import train

LR, BETAS, WD, CLIP, SEED = 6e-4, (0.9, 0.95), 0.1, 1.0, 1337
DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "fortunes_en.txt"


def prepare_data(corpus: Path, root: Path) -> Path:
    """A 5,000-token BPE tokenizer and a train-only dataset (no validation, so no evaluation at the end of a run)."""
    tok = train_tokenizer([corpus], vocab_size=5000, out_dir=root / "tok")
    prepare([corpus], tok, root / "data", val_fraction=0.0)
    return root / "data"


def run_gptforge(model, data_dir: Path, batch: int, block: int, warmup: int, steps: int) -> float:
    """Seconds for the last `steps` steps of a run of warmup + steps, from the engine's own tokens/s metrics."""
    with tempfile.TemporaryDirectory() as out:
        result = train(model, data_dir, out_dir=out, max_steps=warmup + steps, batch_size=batch, block_size=block,
                       learning_rate=LR, beta1=BETAS[0], beta2=BETAS[1], weight_decay=WD, grad_clip=CLIP, seed=SEED,
                       device="cpu", log_interval=1, eval_interval=None, save_minutes=None, plot=False, progress=False)
    rows = [r for r in result.history if "tokens_per_s" in r][warmup:]
    assert len(rows) == steps, f"expected {steps} timed steps, got {len(rows)}"
    return sum(batch * block / r["tokens_per_s"] for r in rows)


def run_hf_loop(model, tokens, batch: int, block: int, warmup: int, steps: int) -> float:
    batches = Batches(tokens, block, batch, seed=SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WD)
    model.train()
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        x, y = batches.batch(step)
        y = y.contiguous()  # already shifted: the same targets as gptforge
        loss = model(input_ids=x, labels=y, shift_labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


class _Windows(torch.utils.data.Dataset):
    """Example i is row i % batch of `Batches` step i // batch: a sequential sampler yields the same batches."""

    def __init__(self, tokens, batch: int, block: int, steps: int):
        self.batches, self.batch, self.steps = Batches(tokens, block, batch, seed=SEED), batch, steps
        self._cache: tuple[int, tuple] | None = None

    def __len__(self) -> int:
        return self.steps * self.batch

    def __getitem__(self, i: int) -> dict:
        step, row = divmod(i, self.batch)
        if self._cache is None or self._cache[0] != step:
            self._cache = (step, self.batches.batch(step))
        x, y = self._cache[1]
        return {"input_ids": x[row], "labels": y[row], "shift_labels": y[row]}


class _StepClock(transformers.TrainerCallback):
    def __init__(self):
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def run_hf_trainer(model, tokens, batch: int, block: int, warmup: int, steps: int) -> float:
    clock = _StepClock()
    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            output_dir=out, per_device_train_batch_size=batch, max_steps=warmup + steps, learning_rate=LR,
            adam_beta1=BETAS[0], adam_beta2=BETAS[1], weight_decay=WD, max_grad_norm=CLIP, lr_scheduler_type="cosine",
            warmup_steps=warmup, logging_steps=10, save_strategy="no", report_to="none", use_cpu=True,
            train_sampling_strategy="sequential", dataloader_num_workers=0, disable_tqdm=True, seed=SEED,
        )
        transformers.Trainer(model=model, args=args, train_dataset=_Windows(tokens, batch, block, warmup + steps),
                             callbacks=[clock]).train()
    assert len(clock.ends) == warmup + steps, f"expected {warmup + steps} steps, got {len(clock.ends)}"
    return clock.ends[-1] - clock.ends[warmup - 1]


def run_shape(name: str, data_dir: Path, trials: int, warmup: int, steps: int | None) -> dict:
    fields, batch, block, default_steps = SHAPES[name]
    steps = steps or max(2, 3 * default_steps)
    config, ours, hf = build(fields)
    tokens = load_split(data_dir, "train")
    runs = {
        "gptforge": lambda: run_gptforge(copy.deepcopy(ours), data_dir, batch, block, warmup, steps),
        "transformers loop": lambda: run_hf_loop(copy.deepcopy(hf), tokens, batch, block, warmup, steps),
        "transformers Trainer": lambda: run_hf_trainer(copy.deepcopy(hf), tokens, batch, block, warmup, steps),
    }
    labels = list(runs)
    tps: dict[str, list[float]] = {k: [] for k in labels}
    for trial in range(trials):
        shift = trial % len(labels)
        for label in labels[shift:] + labels[:shift]:
            seconds = runs[label]()
            tps[label].append(batch * block * steps / seconds)
            print(f"  {name} trial {trial + 1} {label}: {tps[label][-1]:,.0f} tokens/s", flush=True)
    return {"name": name, "config": config, "batch": batch, "block": block, "steps": steps,
            "fpt": flops_per_token(config, block), "tps": {k: statistics.median(v) for k, v in tps.items()}, "all": tps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="small,gpt2", help=f"comma-separated, from {list(SHAPES)}")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of every run")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default: 9 small, 3 gpt2)")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="any text file; only its token ids are used")
    args = parser.parse_args()
    if not args.corpus.is_file():
        parser.error(f"--corpus {args.corpus}: no such file; pass any text file of a few hundred KB or more")
    transformers.logging.set_verbosity_error()

    peak = matmul_peak_gflops()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.machine()}; fp32 matmul peak {peak:.1f} GFLOP/s (2048^2, best of 5)\n", flush=True)
    with tempfile.TemporaryDirectory() as root:
        data_dir = prepare_data(args.corpus, Path(root))
        rows = [run_shape(s, data_dir, args.trials, args.warmup, args.steps) for s in args.shapes.split(",")]

    print("\n| shape | batch x block | implementation | tokens/s | gptforge / this | GFLOP/s | share of fp32 peak |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        c = r["config"]
        desc = f"{r['name']}: {c.n_layer}L {c.n_embd}d {c.n_head}h vocab {c.vocab_size}"
        for label, tps in r["tps"].items():
            gflops = tps * r["fpt"] / 1e9
            print(f"| {desc} | {r['batch']} x {r['block']} | {label} | {tps:,.0f} | {r['tps']['gptforge'] / tps:.2f}x "
                  f"| {gflops:.1f} | {100 * gflops / peak:.0f}% |")
    print(f"\nmedian of {args.trials} trials (order rotating); each run: {args.warmup} warm-up steps, then the timed steps "
          "(" + ", ".join(f"{r['name']} {r['steps']}" for r in rows) + "); fp32 matmul peak "
          f"{peak:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
