"""Decoding speed of the exports: gptforge (f32, int8) against llama.cpp (GGUF f32, f16, q8_0) and ONNX Runtime
(f32, int8).

One model with random weights (`--size`, a preset: `small` by default, `gpt2` for GPT-2's shape) and a BPE
tokenizer trained on made-up text, saved as a model folder and exported with `gptforge export`'s writers.
Each runtime decodes greedily from the same 16-token prompts, `--batch` of them at once (llama.cpp through its
batch API, one sequence id per row; ONNX Runtime's loop here is batch 1 only), `--new-tokens` tokens with no
early stop, on `--threads` threads; trials alternate between runtimes and the table gives the median tokens/s
(all rows' new tokens, prompt time included) and the ratio to gptforge's, all measured in this run.

    python benchmarks/bench_export.py [--size small] [--new-tokens 64] [--trials 3] [--threads 2] [--batch 8]
    python benchmarks/bench_export.py --size gpt2 --isa avx2     # every engine at AVX2 (machine.py)

llama.cpp comes from llama-cpp-python, installed or built with benchmarks/build_llama_cpp.sh (skipped without);
at `--isa avx2` from the folder an AVX2-only build went to (`GPTFORGE_LLAMA_CPP`, default
~/.cache/gptforge/llama-cpp-python-avx2; the build script's header says how).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import add_isa_argument, cpu_name, level_line, use_isa

from gptforge import GPT, preset, save_model
from gptforge.config import GPTConfig
from gptforge.data.vocabulary import train_tokenizer
from gptforge.export_gguf import write_gguf
from gptforge.export_onnx import greedy, quantize_int8, session, write_onnx
from gptforge.generate import generate_ids


def llama_cpp():
    """llama-cpp-python, installed or in the folder benchmarks/build_llama_cpp.sh builds (its AVX2-only build
    when the run emulates AVX2); None without."""
    build = "llama-cpp-python-avx2" if os.environ.get("GPTFORGE_ISA") == "avx2" else "llama-cpp-python"
    folder = os.environ.get("GPTFORGE_LLAMA_CPP", str(Path.home() / ".cache" / "gptforge" / build))
    print(f"llama.cpp: from {folder}")
    sys.path.insert(0, folder)
    try:
        import llama_cpp as module

        return module
    except (ImportError, OSError):
        return None


def model_folder(size: str, root: Path) -> Path:
    rng = random.Random(0)
    words = [("".join(rng.choice("etaoinshrdlucmfw") for _ in range(rng.randint(2, 8)))) for _ in range(3000)]
    text = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(2000)]
    tok = train_tokenizer([], vocab_size=5000, texts=text, out_dir=None)
    torch.manual_seed(0)
    return save_model(
        GPT(preset(size, vocab_size=tok.vocab_size, bos_token_id=tok.eos_id, eos_token_id=tok.eos_id)),
        root / "model",
        tok,
    )


def llama_runner(llama, path: Path, n_ctx: int, rows: int, threads: int, plain: bool):
    """Greedy decoding of `rows` prompts at once through llama.cpp's batch API: one sequence id per row, the
    prompts in one batch, then one token per row per step; argmax of each row's logits."""
    import numpy as np
    from llama_cpp import _internals

    default = llama.llama_cpp.llama_model_default_params

    def plain_params():  # llama.cpp's AMX q8_0 kernels crashed on the machine this was written on: its plain ones
        params = default()
        params.use_extra_bufts = False
        return params

    llama.llama_cpp.llama_model_default_params = plain_params if plain else default
    llm = llama.Llama(str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
    params = llm.context_params
    params.n_ctx, params.n_seq_max, params.kv_unified = n_ctx * rows, rows, False  # a cache per row
    ctx = _internals.LlamaContext(model=llm._model, params=params, verbose=False)
    batch = _internals.LlamaBatch(n_tokens=max(rows * 16, n_ctx), embd=0, n_seq_max=rows, verbose=False)
    n_vocab = llm.n_vocab()

    def run(prompts, n, keep=(llm, ctx, batch)):
        ctx.kv_cache_clear()
        batch.reset()
        for row, prompt in enumerate(prompts):
            batch.add_sequence(prompt, row, False)
        last = list(np.cumsum([len(p) for p in prompts]) - 1)
        pos = [len(p) for p in prompts]
        out = [[] for _ in prompts]
        for _ in range(n):
            ctx.decode(batch)
            picks = [int(np.ctypeslib.as_array(ctx.get_logits_ith(i), shape=(n_vocab,)).argmax()) for i in last]
            batch.reset()
            for row, token in enumerate(picks):
                out[row].append(token)
                b = batch.batch
                b.token[row], b.pos[row], b.seq_id[row][0], b.n_seq_id[row], b.logits[row] = token, pos[row], row, 1, 1
                pos[row] += 1
            batch.batch.n_tokens = len(prompts)
            last = list(range(len(prompts)))
        return out

    return run


def runners(folder: Path, root: Path, threads: int, amx: bool, rows: int) -> dict:
    from gptforge.checkpoint import load_model

    out = {}
    for type, quantize in (("f32", None), ("int8", "int8")):  # int8: gptforge's own weights, made on load
        model = load_model(folder, quantize=quantize)
        out[("gptforge", type)] = lambda p, n, m=model: generate_ids(
            m, p, max_new_tokens=n, do_sample=False, eos_id=None
        )
    if rows == 1:
        write_onnx(folder, root / "model.onnx")
        quantize_int8(root / "model.onnx", root / "model_int8.onnx")
        for type, name in (("f32", "model.onnx"), ("int8", "model_int8.onnx")):
            sess = session(root / name, threads)
            out[("onnxruntime", type)] = lambda p, n, s=sess: [greedy(s, p[0], n)]
    llama = llama_cpp()
    if llama is None:
        print("llama.cpp: llama-cpp-python is not built (bash benchmarks/build_llama_cpp.sh); left out")
        return out
    for type in ("f32", "f16", "q8_0"):
        path = write_gguf(folder, root / f"model-{type}.gguf", type)
        plain = type == "q8_0" and not amx
        out[("llama.cpp", type)] = llama_runner(llama, path, model.config.n_positions, rows, threads, plain)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="small")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 2))
    ap.add_argument("--batch", type=int, default=1, help="prompts decoded together (ONNX Runtime only at 1)")
    ap.add_argument("--amx", action="store_true", help="let llama.cpp use its AMX/repacked q8_0 kernels")
    add_isa_argument(ap)
    args = ap.parse_args()
    use_isa(args.isa)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = model_folder(args.size, root)
        run = runners(folder, root, args.threads, args.amx, args.batch)
        prompts = [[(7 * row + i) % 4000 + 1 for i in range(16)] for row in range(args.batch)]
        times: dict = {key: [] for key in run}
        firsts: dict = {}
        for _ in range(args.trials):
            for key, fn in run.items():
                fn(prompts, 2)  # warm
                start = time.perf_counter()
                got = fn(prompts, args.new_tokens)
                times[key].append(args.batch * args.new_tokens / (time.perf_counter() - start))
                firsts[key] = got[0][:8]
        params = GPTConfig.load(folder).num_params()
    base = statistics.median(times[("gptforge", "f32")])
    print(
        f"\n{args.size} ({params / 1e6:.1f}M parameters), batch {args.batch}, {args.new_tokens} new tokens, "
        f"{args.threads} threads, {cpu_name()} ({platform.machine()}), torch {torch.__version__}, "
        f"median of {args.trials}\n{level_line()}\n"
    )
    print("| runtime | weights | tokens/s | vs gptforge f32 | first greedy tokens of row 0 |")
    print("| --- | --- | ---: | ---: | --- |")
    for (runtime, type), values in times.items():
        speed = statistics.median(values)
        print(f"| {runtime} | {type} | {speed:,.1f} | {speed / base:.2f}x | {firsts[(runtime, type)]} |")


if __name__ == "__main__":
    main()
