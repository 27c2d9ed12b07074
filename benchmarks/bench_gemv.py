"""The products of one decoding step of `gpt2` (124M): gptforge's decoding kernel against torch's products.

The 49 fp32 products of a step (4 per block x 12, and the 50,257-row head), each with its own random weight
(497 MB in all, more than the caches), at 1 and 8 input rows: oneDNN's product on its packed weight (what
gptforge used before the kernel, and uses where the kernel cannot be built), oneDNN on the weight as it is
(what gptforge uses for prompts), F.linear (what transformers calls), and the kernel on its packed copy
(native.py), in memory advised to 2 MB pages as gptforge makes it, and in torch's own allocation (4 KB
pages). `torch.sum` over the same weights shows what reading them costs. Rounds alternate the ways; the
table gives the best and the median round.

    python benchmarks/bench_gemv.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from machine import cpu_name  # noqa: E402

from gptforge import kernels
from gptforge.inference import native


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    if not native.available():
        raise SystemExit("needs a machine where gptforge's decoding kernel builds (Linux or macOS, a C compiler)")
    with_onednn = hasattr(torch.ops.mkldnn, "_reorder_linear_weight")  # oneDNN's rows where this torch has the ops
    torch.manual_seed(0)
    shapes = [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12 + [(50257, 768)]
    weights = [torch.randn(o, i) for o, i in shapes]
    biases = [torch.randn(o) if o != 50257 else None for o, _ in shapes]
    onednn = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in weights] if with_onednn else []
    packed = [native.pack(w) for w in weights]  # in memory advised to 2 MB pages (native.pack's default)
    small_pages = [
        native.pack(w, huge_pages=False) for w in weights
    ]  # the same, in torch's own allocation (4 KB pages)
    megabytes = sum(w.numel() * 4 for w in weights) / 1e6
    ways = (
        {
            "oneDNN, packed weight": lambda x, i: kernels.onednn_linear(x, onednn[i], biases[i]),
            "oneDNN, weight as it is": lambda x, i: kernels.onednn_linear(x, weights[i], biases[i]),
        }
        if with_onednn
        else {}
    )
    ways |= {
        "F.linear": lambda x, i: F.linear(x, weights[i], biases[i]),
        "gptforge decoding kernel, 4 KB pages": lambda x, i: native.gemv(x, small_pages[i], biases[i]),
        "gptforge decoding kernel": lambda x, i: native.gemv(x, packed[i], biases[i]),
        "torch.sum of the weights (reading alone)": lambda x, i: weights[i].sum(),
    }
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"load average {os.getloadavg()[0]:.1f}; {megabytes:.0f} MB of weights, {args.rounds} rounds; kernel built "
        f"for {os.environ.get('GPTFORGE_ISA', 'native')} ({native.vector_width()}-float vectors)"
    )
    times: dict[tuple, list[float]] = {}
    with torch.inference_mode():
        for rows in (1, 8):
            inputs = {i: torch.randn(rows, i) for i in (768, 3072)}
            for _ in range(args.rounds):
                for name, way in ways.items():
                    for i, w in enumerate(weights):  # warm: the pages are touched, the threads awake
                        way(inputs[w.shape[1]], i)
                    start = time.perf_counter()
                    for i, w in enumerate(weights):
                        way(inputs[w.shape[1]], i)
                    times.setdefault((rows, name), []).append(time.perf_counter() - start)
    print("\n| rows | products | best, ms | median, ms | GB/s (best) |\n| --- | --- | ---: | ---: | ---: |")
    for (rows, name), t in times.items():
        print(
            f"| {rows} | {name} | {min(t) * 1e3:.1f} | {statistics.median(t) * 1e3:.1f} | "
            f"{megabytes / 1e3 / min(t):.1f} |"
        )


if __name__ == "__main__":
    main()
