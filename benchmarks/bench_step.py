"""Training-step speed: gptforge's GPT against transformers' GPT2LMHeadModel, same weights, same batch, same run.

A step is forward + loss + backward + AdamW (fused: what gptforge's trainer and transformers' Trainer both take
with torch >= 2.8). Trials of the models are interleaved (the order alternating) and the median is reported, so
that load from other jobs on the machine hits all alike.

gptforge's step is the one `--precision auto` trains with: where calibration chose bf16 products (processors with
AMX or AVX-512 BF16 that multiply bf16 much faster: calibrate.py's `bf16`), its products take bf16 inputs with
fp32 sums and everything else stays fp32. On such a processor two more rows say what that is worth: gptforge at
`--precision fp32`, and transformers with torch's own switch for the same products
(`torch.backends.mkldnn.matmul.fp32_precision = "bf16"`, which also takes attention's products).

FLOPs per token (training) = 6 * N + 12 * n_layer * n_embd * T, where N is the non-embedding parameter count
plus the output head (vocab_size * n_embd; the head is tied to wte but its matrix product is still done), and the
second term is the attention score and weighted-sum products (QK^T and AV, 2 * 2 * T * n_embd per layer forward,
times 3 for forward + backward; no discount for the causal mask, as in the PaLM paper's accounting).
The peak is the best fp32 rate of large square matmuls measured at the start of the run.

    python benchmarks/bench_step.py                  # both shapes
    python benchmarks/bench_step.py --shapes small --trials 7
    python benchmarks/bench_step.py --profile        # also print the top operators of one step of each
    python benchmarks/bench_step.py --isa avx2       # everything at AVX2 (emulated on a newer CPU)
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import transformers
from machine import add_isa_argument, cpu_name, level_line, paths_line, use_isa

from gptforge import GPT, GPTConfig, kernels, preset
from gptforge.checkpoint import to_hf_state_dict
from gptforge.runtime import cpu_bf16_products
from gptforge.train import matmul_flops

SHAPES = {
    # name: (config fields, batch, block, steps per trial)
    "tiny": (
        {
            "vocab_size": 5000,
            "n_positions": 128,
            "n_embd": 128,
            "n_layer": 4,
            "n_head": 4,  # the CPU default size
            "bos_token_id": 0,
            "eos_token_id": 0,
        },
        16,
        128,
        6,
    ),
    "small": (
        {
            "vocab_size": 5000,
            "n_positions": 128,
            "n_embd": 256,
            "n_layer": 8,
            "n_head": 8,
            "bos_token_id": 0,
            "eos_token_id": 0,
        },
        16,
        128,
        3,
    ),
    "gpt2": ({}, 1, 1024, 1),
}


def matmul_peak_gflops(sizes: tuple[int, ...] = (2048, 4096), repeats: int = 3) -> float:
    """Best fp32 GFLOP/s of large square matrix products (2 n^3 FLOPs each): the machine's practical peak."""
    return max(matmul_flops(torch.device("cpu"), n=n, repeats=repeats) for n in sizes) / 1e9


def build(fields: dict) -> tuple[GPTConfig, GPT]:
    config = preset("gpt2", **fields, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return config, GPT(config).train()


def hf_copy(ours: GPT, **overrides):
    """transformers' GPT2LMHeadModel with the same weights (SDPA attention, its default)."""
    hf_fields = {k: v for k, v in ours.config.to_dict().items() if k != "architectures"}
    hf_fields.update(overrides)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_fields, attn_implementation="sdpa"))
    hf.load_state_dict(to_hf_state_dict(ours.state_dict()), strict=False)  # lm_head.weight is tied to wte
    hf.tie_weights()
    return hf.train()


def make_step(model, hf: bool, x: torch.Tensor, y: torch.Tensor, bf16: bool = False):
    """One training step; `bf16`: gptforge's bf16 products (ours), torch's global switch (transformers')."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    flag = torch.backends.mkldnn.matmul

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        if hf:
            before, flag.fp32_precision = flag.fp32_precision, "bf16" if bf16 else flag.fp32_precision
            loss = model(input_ids=x, labels=x).loss  # transformers shifts the labels itself
            loss.backward()
            flag.fp32_precision = before
        else:
            with kernels.bf16_products(bf16):
                loss = model(x, y)[1]
                loss.backward()
        opt.step()

    return step


def profile(step, label: str) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    with prof(activities=[ProfilerActivity.CPU]) as p:
        step()
    print(f"\n### {label}: top operators of one step\n")
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def run_shape(name: str, trials: int, peak: float, do_profile: bool, fused_gelu: bool) -> dict:
    fields, batch, block, steps = SHAPES[name]
    config, ours = build(fields)
    hfs = {"transformers": hf_copy(ours)}
    if fused_gelu:  # the same network with transformers' fused tanh-GELU instead of gelu_new's separate ops
        hfs["transformers, gelu_pytorch_tanh"] = hf_copy(ours, activation_function="gelu_pytorch_tanh")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, config.vocab_size, (batch, block), generator=g)
    y = torch.cat([x[:, 1:], torch.full((batch, 1), -100)], dim=1)  # same targets transformers builds from labels
    with torch.no_grad():  # same weights: same loss
        for hf in hfs.values():
            diff = abs(ours(x, y)[1].item() - hf(input_ids=x, labels=x).loss.item())
            assert diff < 1e-4, f"models disagree (loss difference {diff})"
    bf16 = cpu_bf16_products("auto", torch.device("cpu"))
    runs = {"gptforge": make_step(ours, False, x, y, bf16)}
    runs.update({label: make_step(hf, True, x, y) for label, hf in hfs.items()})
    if bf16:  # what the bf16 products are worth, to gptforge and to transformers
        runs["gptforge, --precision fp32"] = make_step(ours, False, x, y)
        runs["transformers, torch's bf16 products"] = make_step(hfs["transformers"], True, x, y, True)
    for step in runs.values():
        step()  # warm-up: allocator, optimizer state
    times: dict[str, list[float]] = {k: [] for k in runs}
    for trial in range(trials):
        order = list(runs) if trial % 2 == 0 else list(runs)[::-1]
        for label in order:
            t = time.perf_counter()
            for _ in range(steps):
                runs[label]()
            times[label].append((time.perf_counter() - t) / steps)
    if do_profile:
        for label, step in runs.items():
            profile(step, f"{name} / {label}")
    tokens = batch * block
    fpt = config.flops_per_token(block)
    row = {"shape": name, "config": config, "batch": batch, "block": block, "peak": peak, "results": {}}
    for label, ts in times.items():
        med = statistics.median(ts)
        row["results"][label] = (tokens / med, tokens / med * fpt / 1e9, min(ts), max(ts))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="small,gpt2", help=f"comma-separated, from {list(SHAPES)}")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--fused-gelu", action="store_true", help="also time transformers with activation_function=gelu_pytorch_tanh"
    )
    add_isa_argument(parser)
    args = parser.parse_args()
    use_isa(args.isa)

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    peak = matmul_peak_gflops()
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {threads} threads, "
        f"{platform.machine()}; fp32 matmul peak {peak:.1f} GFLOP/s (best of 2048^2 and 4096^2 products)"
    )
    print(f"machine: {cpu_name()}; {level_line()}\n{paths_line()}\n", flush=True)
    rows = [run_shape(s, args.trials, peak, args.profile, args.fused_gelu) for s in args.shapes.split(",")]
    print(
        "| shape | batch x block | implementation | tokens/s | gptforge speed-up | GFLOP/s | % of peak | step min / "
        "max |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        c = r["config"]
        desc = f"{r['shape']}: {c.n_layer}L {c.n_embd}d {c.n_head}h vocab {c.vocab_size}"
        ours = r["results"]["gptforge"][0]
        for label, (tps, gflops, lo, hi) in r["results"].items():
            ratio = "" if label == "gptforge" else f"{ours / tps:.2f}x"
            print(
                f"| {desc} | {r['batch']} x {r['block']} | {label} | {tps:,.0f} | {ratio} | {gflops:.1f} "
                f"| {100 * gflops / r['peak']:.0f}% | {lo * 1e3:,.0f} / {hi * 1e3:,.0f} ms |"
            )
    print(f"\nmedian of {args.trials} interleaved trials; speed-up = gptforge tokens/s / that row's tokens/s")


if __name__ == "__main__":
    main()
