"""Generation speed: gptforge's decode loop against transformers' `generate` on the same weights.

For each model (random weights, `gpt2` shape = 124M, and the `small` preset), batch 1 and batch 8: a
32-token prompt, 200 new tokens, greedy decoding with no early stop, so both do identical work. A
gptforge model is saved and then opened with transformers' GPT2LMHeadModel (its KV cache on, the
default). Trials of both alternate and the table reports medians, because the machine may be shared.

    python benchmarks/bench_generate.py [--trials 5] [--models gpt2,small] [--new-tokens 200] [--threads N]

tokens/s counts new tokens of all rows over the whole call (prompt processing included); time to first
token is a call with max_new_tokens=1.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
from machine import cpu_name  # noqa: E402

from gptforge import GPT, preset, save_model
from gptforge.generate import generate_ids


def run_ours(model, prompt: torch.Tensor, new: int, sample: bool) -> list[list[int]]:
    kw = dict(top_k=50, temperature=0.8, seed=0) if sample else dict(do_sample=False)
    return generate_ids(model, prompt, max_new_tokens=new, eos_id=None, batch_size=prompt.size(0), **kw)


@torch.inference_mode()
def run_hf(model, prompt: torch.Tensor, new: int, sample: bool) -> torch.Tensor:
    kw = dict(do_sample=True, top_k=50, temperature=0.8) if sample else dict(do_sample=False)
    return model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new,
        min_new_tokens=new,
        pad_token_id=0,
        use_cache=True,
        **kw,
    )


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--models", default="gpt2,small")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--sample", action="store_true", help="top-k 50 sampling instead of greedy")
    ap.add_argument("--threads", type=int, help="torch threads for both (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}, python {platform.python_version()}",
        file=sys.stderr,
    )
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        ours = GPT(preset(name)).eval()
        with tempfile.TemporaryDirectory() as folder:
            save_model(ours, folder)
            hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
        vocab = ours.config.vocab_size
        for batch in map(int, args.batches.split(",")):
            prompt = torch.randint(
                1, vocab, (batch, args.prompt_tokens), generator=torch.Generator().manual_seed(batch)
            )
            if not args.sample:  # same weights, same greedy tokens: check before timing
                a = run_ours(ours, prompt, 20, False)
                b = run_hf(hf, prompt, 20, False)[:, prompt.size(1) :].tolist()
                assert a == b, f"{name} batch {batch}: greedy tokens differ from transformers"
            for fn in (run_ours, run_hf):  # warm-up
                fn(ours if fn is run_ours else hf, prompt, 4, args.sample)
            times = {"ours": [], "hf": [], "ours_ttft": [], "hf_ttft": []}
            for trial in range(args.trials):
                order = [("ours", run_ours, ours), ("hf", run_hf, hf)]
                if trial % 2:
                    order.reverse()
                for key, fn, model in order:
                    times[key].append(timed(lambda: fn(model, prompt, args.new_tokens, args.sample)))
                    times[key + "_ttft"].append(timed(lambda: fn(model, prompt, 1, args.sample)))
            med = {k: statistics.median(v) for k, v in times.items()}
            n = batch * args.new_tokens
            rows.append(
                (
                    name,
                    f"{ours.num_params() / 1e6:.0f}M",
                    batch,
                    n / med["ours"],
                    n / med["hf"],
                    med["hf"] / med["ours"],
                    med["ours_ttft"] * 1e3,
                    med["hf_ttft"] * 1e3,
                )
            )
            print(f"done {name} batch {batch}", file=sys.stderr)
    mode = "top-k 50 sampling" if args.sample else "greedy"
    print(
        f"\n{args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, {mode}, median of {args.trials} "
        "interleaved trials\n"
    )
    print(
        "| model | params | batch | gptforge tokens/s | transformers tokens/s | speed-up | gptforge TTFT ms | "
        "transformers TTFT ms |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]:.1f} | {r[5]:.2f}x | {r[6]:.1f} | {r[7]:.1f} |")


if __name__ == "__main__":
    main()
