"""The decoding step in C (fastdecode.py) against the same step through torch, fp32 and int8, 1 to 8 rows.

`gpt2`-shaped random weights (124M); greedy generation of `--new-tokens` tokens after a 32-token prompt, one
prompt repeated to each batch size. "torch" is the model's own forward for every step (the decoding kernel
for fp32 products, fbgemm's int8 products for an int8 model: what gptforge ran before the C step); "C step"
is csrc/decode.c's whole step. Both are timed at every batch size, whatever this machine's calibration
chose (GPTFORGE_CALIBRATION is set for the run; docs/performance.md), to show where each takes over. Rounds alternate
the two ways; the
table gives the best and the median round in new tokens per second.

    python benchmarks/bench_decode_step.py [--rounds 3] [--new-tokens 100]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from machine import cpu_name

import gptforge.generate as generate_module
from gptforge import GPT, cpu, preset
from gptforge.generate import generate_ids
from gptforge.inference import native
from gptforge.inference.quantize import quantize_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=100)
    ap.add_argument("--rows", default="1,2,3,4,6,8")
    args = ap.parse_args()
    if not native.available():
        raise SystemExit("needs an x86-64 Linux machine and a C compiler")
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"load average {os.getloadavg()[0]:.1f}; gpt2 shape, random weights, {args.new_tokens} new tokens, "
        f"{args.rounds} rounds",
        flush=True,
    )
    torch.manual_seed(0)
    fp32 = GPT(preset("gpt2")).eval()
    int8 = quantize_model(fp32, inplace=False)
    prompt = torch.randint(0, fp32.config.vocab_size, (32,)).tolist()
    in_c, through_torch = generate_module.decoder, (lambda model, rows: None)
    # the C step at every batch size, fp32 and int8, whatever the calibration chose; torch's threads
    os.environ["GPTFORGE_CALIBRATION"] = f"fp32_rows={cpu.MAX_ROWS},int8_rows={cpu.MAX_ROWS},threads=0"
    rates: dict[tuple, list[float]] = {}
    for rows in map(int, args.rows.split(",")):
        for _ in range(args.rounds):
            for precision, model in (("fp32", fp32), ("int8", int8)):
                for way, dec in (("torch", through_torch), ("C step", in_c)):
                    generate_module.decoder = dec
                    kw = {"max_new_tokens": args.new_tokens, "do_sample": False, "eos_id": None, "batch_size": rows}
                    generate_ids(model, [prompt] * rows, **{**kw, "max_new_tokens": 3})  # warm
                    start = time.perf_counter()
                    generate_ids(model, [prompt] * rows, **kw)
                    rates.setdefault((precision, rows, way), []).append(
                        rows * args.new_tokens / (time.perf_counter() - start)
                    )
        print(f"rows {rows} done, load average {os.getloadavg()[0]:.1f}", flush=True)
    print(
        "\n| precision | rows | torch, tokens/s | C step, tokens/s | C / torch (medians) |\n| --- | --- | ---: | ---: "
        "| ---: |"
    )
    for precision in ("fp32", "int8"):
        for rows in map(int, args.rows.split(",")):
            t, c = rates[(precision, rows, "torch")], rates[(precision, rows, "C step")]
            print(
                f"| {precision} | {rows} | {statistics.median(t):.1f} (best {max(t):.1f}) | "
                f"{statistics.median(c):.1f} (best {max(c):.1f}) | {statistics.median(c) / statistics.median(t):.2f}x |"
            )


if __name__ == "__main__":
    main()
