"""Training throughput: `gptforge.train.train` against a plain transformers loop and the transformers Trainer.

All three train the same GPT-2 (same config, same initial weights, dropout 0 as in bench_step.py) on the same
batches (gptforge's `Batches` over one prepared dataset), with AdamW at the same lr / betas / weight decay and
gradient clipping at 1.0, in fp32 on the CPU:

* gptforge: the real engine, `gptforge.train.train(...)` for W + M optimizer steps, log interval 1;
  step times come from its own metrics rows (tokens/s, which leave out the time spent in `on_step`).
* transformers loop: `GPT2LMHeadModel` with `torch.optim.AdamW` at torch's defaults otherwise (what a
  hand-written loop gets), `clip_grad_norm_`, one batch per step.
* transformers Trainer: `Trainer.train()` with `TrainingArguments` (its default optimizer, cosine schedule,
  sequential sampler over the same batches), run in a thread that a callback pauses after every step.

The three run in lock-step: from gptforge's `on_step` callback, the loop and the Trainer each take one step,
so that all three meet the same load from other jobs on the machine within seconds (a run-by-run
alternation on a shared 2-core machine swung 5x between trials). The first W steps of each are warm-up and
not timed. The table shows the median tokens/s over the M timed steps, ratios, and achieved GFLOP/s as a
share of the fp32 matmul peak (the best of bench_step.matmul_peak_gflops at the start and at the end; FLOPs
per token as in bench_step.py). The text only supplies real token ids: its tokenizer has 5,000 tokens,
which the gpt2 shape (vocabulary 50,257) uses as a subset.

    python benchmarks/bench_train.py                           # both shapes
    python benchmarks/bench_train.py --shapes small --steps 30
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
import transformers
from bench_step import SHAPES, build, hf_copy, matmul_peak_gflops  # same models, FLOP count and peak

from gptforge.data import Batches, load_split, prepare
from gptforge.data.vocabulary import train_tokenizer
from gptforge.train import train

LR, BETAS, WD, CLIP, SEED = 6e-4, (0.9, 0.95), 0.1, 1.0, 1337
DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "fortunes_en.txt"


def prepare_data(corpus: Path, root: Path) -> Path:
    """A 5,000-token BPE tokenizer and a train-only dataset (no validation, so no evaluation at the end of a run)."""
    tok = train_tokenizer([corpus], vocab_size=5000, out_dir=root / "tok")
    prepare([corpus], tok, root / "data", val_fraction=0.0)
    return root / "data"


def hf_loop(model, tokens, batch: int, block: int):
    """A plain transformers training loop, one optimizer step per call; each call returns its seconds."""
    batches = Batches(tokens, block, batch, seed=SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WD)  # torch's defaults otherwise
    model.train()
    step = 0

    def one_step() -> float:
        nonlocal step
        start = time.perf_counter()
        x, y = batches.batch(step)
        y = y.contiguous()  # already shifted: the same targets as gptforge
        loss = model(input_ids=x, labels=y, shift_labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        return time.perf_counter() - start

    return one_step


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


class SteppedTrainer:
    """transformers' `Trainer.train()` in a thread that pauses after each optimizer step until `step()` lets it
    take the next one, so that its steps interleave with the others'. The first step (set-up included) is
    taken on construction; `step()` returns the seconds of everything the Trainer did for one more step."""

    def __init__(self, model, tokens, batch: int, block: int, steps: int):
        self._go, self._done = threading.Semaphore(0), threading.Semaphore(0)
        self._error: BaseException | None = None
        gate = self

        class Gate(transformers.TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                gate._done.release()
                if state.global_step < state.max_steps:
                    gate._go.acquire()

        self._out = tempfile.TemporaryDirectory()
        args = transformers.TrainingArguments(
            output_dir=self._out.name,
            per_device_train_batch_size=batch,
            max_steps=steps,
            learning_rate=LR,
            adam_beta1=BETAS[0],
            adam_beta2=BETAS[1],
            weight_decay=WD,
            max_grad_norm=CLIP,
            lr_scheduler_type="cosine",
            logging_steps=10,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            train_sampling_strategy="sequential",
            dataloader_num_workers=0,
            disable_tqdm=True,
            seed=SEED,
        )
        self.trainer = transformers.Trainer(
            model=model, args=args, train_dataset=_Windows(tokens, batch, block, steps), callbacks=[Gate()]
        )
        self._thread = threading.Thread(target=self._train, daemon=True)
        self._thread.start()
        self._wait()

    def _train(self) -> None:
        try:
            self.trainer.train()
        except BaseException as e:  # handed to the caller of step()
            self._error = e
            self._done.release()

    def _wait(self) -> None:
        self._done.acquire()
        if self._error is not None:
            raise self._error

    def step(self) -> float:
        start = time.perf_counter()
        self._go.release()
        self._wait()
        return time.perf_counter() - start

    def close(self) -> None:
        self._thread.join()
        self._out.cleanup()


def run_shape(name: str, data_dir: Path, warmup: int, steps: int | None) -> dict:
    """One lock-step run: after each gptforge step (inside its on_step callback) the transformers loop and the
    Trainer take one step each, so that all three meet the same load from other jobs."""
    fields, batch, block, default_steps = SHAPES[name]
    steps = steps or max(6, 6 * default_steps)
    config, ours = build(fields)
    hf = hf_copy(ours)
    tokens = load_split(data_dir, "train")
    loop = hf_loop(copy.deepcopy(hf), tokens, batch, block)
    trainer = SteppedTrainer(copy.deepcopy(hf), tokens, batch, block, warmup + steps + 1)
    seconds = {"gptforge": [], "transformers loop": [], "transformers Trainer": []}

    def on_step(_) -> None:  # the engine leaves time spent in on_step out of its tokens/s
        seconds["transformers loop"].append(loop())
        seconds["transformers Trainer"].append(trainer.step())

    with tempfile.TemporaryDirectory() as out:
        result = train(
            ours,
            data_dir,
            out_dir=out,
            max_steps=warmup + steps,
            batch_size=batch,
            block_size=block,
            learning_rate=LR,
            beta1=BETAS[0],
            beta2=BETAS[1],
            weight_decay=WD,
            grad_clip=CLIP,
            seed=SEED,
            optimizer="adamw",
            schedule="cosine",
            min_lr_ratio=0.1,
            ema=0.0,  # the references' step
            device="cpu",
            log_interval=1,
            eval_interval=None,
            save_minutes=None,
            plot=False,
            progress=False,
            on_step=on_step,
        )
    trainer.close()
    seconds["gptforge"] = [batch * block / r["tokens_per_s"] for r in result.history if "tokens_per_s" in r]
    tps = {k: [batch * block / t for t in v[warmup:]] for k, v in seconds.items()}
    assert all(len(v) == steps for v in tps.values()), {k: len(v) for k, v in tps.items()}
    for label, values in tps.items():
        print(f"  {name} {label}: " + ", ".join(f"{v:,.0f}" for v in values) + " tokens/s", flush=True)
    return {
        "name": name,
        "config": config,
        "batch": batch,
        "block": block,
        "steps": steps,
        "fpt": config.flops_per_token(block),
        "tps": {k: statistics.median(v) for k, v in tps.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="small,gpt2", help=f"comma-separated, from {list(SHAPES)}")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of every run")
    parser.add_argument("--steps", type=int, default=None, help="timed steps of each (default: 18 small, 6 gpt2)")
    parser.add_argument(
        "--corpus", type=Path, default=DEFAULT_CORPUS, help="any text file; only its token ids are used"
    )
    args = parser.parse_args()
    if not args.corpus.is_file():
        parser.error(f"--corpus {args.corpus}: no such file; pass any text file of a few hundred KB or more")
    transformers.logging.set_verbosity_error()

    peak = matmul_peak_gflops()
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.machine()}; fp32 matmul peak at the start {peak:.1f} GFLOP/s (bench_step.matmul_peak_gflops)\n",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as root:
        data_dir = prepare_data(args.corpus, Path(root))
        rows = [run_shape(s, data_dir, args.warmup, args.steps) for s in args.shapes.split(",")]
    peak = max(
        peak, matmul_peak_gflops()
    )  # measured again at the end: the best seen is the least disturbed by other jobs

    print("\n| shape | batch x block | implementation | tokens/s | gptforge / this | GFLOP/s | share of fp32 peak |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        c = r["config"]
        desc = f"{r['name']}: {c.n_layer}L {c.n_embd}d {c.n_head}h vocab {c.vocab_size}"
        for label, tps in r["tps"].items():
            gflops = tps * r["fpt"] / 1e9
            print(
                f"| {desc} | {r['batch']} x {r['block']} | {label} | {tps:,.0f} | {r['tps']['gptforge'] / tps:.2f}x "
                f"| {gflops:.1f} | {100 * gflops / peak:.0f}% |"
            )
    print(
        "\nmedian over the timed steps ("
        + ", ".join(f"{r['name']} {r['steps']}" for r in rows)
        + "), taken in lock-step "
        f"after {args.warmup} untimed warm-up steps each; fp32 matmul peak {peak:.1f} GFLOP/s (best of the "
        "measurements at the start and the end)"
    )


if __name__ == "__main__":
    main()
