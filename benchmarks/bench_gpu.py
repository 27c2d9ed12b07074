"""GPU training throughput and model FLOPs utilisation (MFU) of GPT-2 124M, against a plain PyTorch loop.

    python benchmarks/bench_gpu.py                    # on a CUDA machine: gpt2 at block 1024, bf16
    python benchmarks/bench_gpu.py --largest          # also: which presets fine-tune on this one GPU
    python benchmarks/bench_gpu.py --device cpu --smoke   # check the script itself on a CPU (tiny sizes)

Both contenders train the same network (gptforge's GPT, same weights, same batches):
  * gptforge: the real `Trainer` (bf16 autocast, TF32, fused AdamW, torch.compile, background batches);
  * reference: a plain PyTorch loop as one would write it by hand: the same model compiled, bf16
    autocast, fused AdamW, batches sliced from the same token array on the host each step.
MFU = tokens/s x FLOPs per token / measured bf16 matmul peak, FLOPs per token = 6 N + 12 L T C with
N the non-embedding parameters plus the output head (PaLM's accounting, as nanoGPT uses).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from gptforge.config import preset
from gptforge.model import GPT
from gptforge.train import RunData, TrainConfig, Trainer, configure_optimizer, matmul_flops


def bench_gptforge(
    model: GPT,
    tokens: np.ndarray,
    block: int,
    batch: int,
    steps: int,
    device: str,
    compile: bool,
    checkpointing: bool = False,
) -> float:
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(
            out_dir=out,
            max_steps=steps,
            batch_size=batch,
            block_size=block,
            device=device,
            compile=compile,
            gradient_checkpointing=checkpointing,
            log_interval=5,
            eval_interval=None,
            save_minutes=None,
            progress=False,
            plot=False,
            learning_rate=6e-4,
            warmup_steps=5,
            optimizer="adamw",
        )  # the reference's AdamW step
        trainer = Trainer(model, RunData(tokens, None, None), cfg)
        result = trainer.run()
    rows = [r for r in result.history if "tokens_per_s" in r][2:]  # the first rows include compilation
    return float(np.median([r["tokens_per_s"] for r in rows]))


def bench_reference(
    model: GPT, tokens: np.ndarray, block: int, batch: int, steps: int, device: torch.device, compile: bool
) -> float:
    model = model.to(device).train()
    opt = configure_optimizer(model, TrainConfig(learning_rate=6e-4, weight_decay=0.1, beta2=0.95), device)
    fwd = torch.compile(model) if compile else model
    rng = np.random.default_rng(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    times = []
    for step in range(steps):
        t = time.perf_counter()
        starts = rng.integers(0, len(tokens) - block - 1, size=batch)
        rows = torch.from_numpy(np.stack([tokens[s : s + block + 1] for s in starts]).astype(np.int64)).to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            _, loss = fwd(rows[:, :-1], rows[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # a hand-written loop usually prints the loss every step
        times.append(time.perf_counter() - t)
    return batch * block / float(np.median(times[steps // 3 :]))


def peak_memory_run(name: str, block: int, device: torch.device, steps: int = 4) -> tuple[float, float]:
    """tokens/s and peak GiB of fine-tuning preset `name` (batch 1, activation checkpointing, bf16 autocast)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = GPT(preset(name))
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, 2_000_000, dtype=np.uint16)
    tps = bench_gptforge(model, tokens, block, 1, steps + 10, str(device), compile=False, checkpointing=True)
    return tps, torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--largest", action="store_true", help="also fine-tune each bigger preset on this one GPU")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script on a CPU")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    block = 64 if args.smoke else 1024
    torch.manual_seed(0)
    model = GPT(
        preset("tiny" if args.smoke else "gpt2", n_positions=block, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    )
    tokens = np.random.default_rng(0).integers(
        0, model.config.vocab_size, 20_000_000 if not args.smoke else 200_000, dtype=np.uint16
    )
    peak_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = matmul_flops(device, peak_dtype, n=8192 if device.type == "cuda" else 1024, repeats=20)
    fpt = model.config.flops_per_token(block)
    compile = not args.no_compile
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ours = bench_gptforge(model, tokens, block, args.batch, args.steps, args.device, compile)
    ref_model = GPT(model.config)
    ref_model.load_state_dict(state)
    ref = bench_reference(ref_model, tokens, block, args.batch, args.steps, device, compile)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\n{name}, torch {torch.__version__}, measured {str(peak_dtype)[6:]} matmul peak {peak / 1e12:.1f} TFLOP/s")
    print(f"model: {'tiny' if args.smoke else 'gpt2 (124M)'}, block {block}, batch {args.batch}, compile={compile}\n")
    print("| loop | tokens/s | TFLOP/s | MFU | vs reference |")
    print("| --- | --- | --- | --- | --- |")
    for label, tps in (("gptforge Trainer", ours), ("plain PyTorch loop", ref)):
        print(f"| {label} | {tps:,.0f} | {tps * fpt / 1e12:.1f} | {tps * fpt / peak:.1%} | {tps / ref:.2f}x |")
    if args.largest and device.type == "cuda":
        print("\n| preset | tokens/s (batch 1, block 1024, checkpointing) | peak memory GiB |")
        print("| --- | --- | --- |")
        for name in ("gpt2-medium", "gpt2-large", "gpt2-xl"):
            try:
                tps, mem = peak_memory_run(name, 1024, device)
                print(f"| {name} | {tps:,.0f} | {mem:.1f} |")
            except torch.OutOfMemoryError:
                print(f"| {name} | out of memory | - |")


if __name__ == "__main__":
    main()
