"""Decoding speed of the exports: gptforge (f32, int8) against llama.cpp (GGUF f32, f16, q8_0) and ONNX Runtime
(f32, int8).

One model with random weights (`--size`, a preset: `small` by default, `gpt2` for GPT-2's shape) and a BPE
tokenizer trained on made-up text, saved as a model folder and exported with `gptforge export`'s writers.
Each runtime decodes greedily from the same 16-token prompt, batch 1, `--new-tokens` tokens with no early stop,
on `--threads` threads; trials alternate between runtimes and the table gives the median tokens/s (prompt
included) and the ratio to gptforge's, all measured in this run.

    python benchmarks/bench_export.py [--size small] [--new-tokens 64] [--trials 3] [--threads 2]

llama.cpp comes from llama-cpp-python, installed or built with benchmarks/build_llama_cpp.sh (skipped without).
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
from machine import cpu_name  # noqa: E402

from gptforge import GPT, preset, save_model
from gptforge.config import GPTConfig
from gptforge.data.vocabulary import train_tokenizer
from gptforge.export_gguf import write_gguf
from gptforge.export_onnx import greedy, quantize_int8, session, write_onnx
from gptforge.generate import generate_ids


def llama_cpp():
    """llama-cpp-python, installed or in the folder benchmarks/build_llama_cpp.sh builds; None without."""
    folder = os.environ.get("GPTFORGE_LLAMA_CPP", str(Path.home() / ".cache" / "gptforge" / "llama-cpp-python"))
    sys.path.append(folder)
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


def runners(folder: Path, root: Path, threads: int, amx: bool) -> dict:
    from gptforge.checkpoint import load_model

    out = {}
    for type, quantize in (("f32", None), ("int8", "int8")):  # int8: gptforge's own weights, made on load
        model = load_model(folder, quantize=quantize)
        out[("gptforge", type)] = lambda p, n, m=model: generate_ids(
            m, p, max_new_tokens=n, do_sample=False, eos_id=None
        )
    write_onnx(folder, root / "model.onnx")
    quantize_int8(root / "model.onnx", root / "model_int8.onnx")
    for type, name in (("f32", "model.onnx"), ("int8", "model_int8.onnx")):
        sess = session(root / name, threads)
        out[("onnxruntime", type)] = lambda p, n, s=sess: greedy(s, p, n)
    llama = llama_cpp()
    if llama is None:
        print("llama.cpp: llama-cpp-python is not built (bash benchmarks/build_llama_cpp.sh); left out")
        return out
    default = llama.llama_cpp.llama_model_default_params

    def plain():  # llama.cpp's AMX q8_0 kernels crashed on the machine this was written on: its plain ones
        params = default()
        params.use_extra_bufts = False
        return params

    for type in ("f32", "f16", "q8_0"):
        path = write_gguf(folder, root / f"model-{type}.gguf", type)
        llama.llama_cpp.llama_model_default_params = plain if type == "q8_0" and not amx else default
        llm = llama.Llama(str(path), n_ctx=model.config.n_positions, n_threads=threads, verbose=False)

        def run(p, n, llm=llm):
            got = []
            for token in llm.generate(p, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
                got.append(token)
                if len(got) == n:
                    return got

        out[("llama.cpp", type)] = run
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="small")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 2))
    ap.add_argument("--amx", action="store_true", help="let llama.cpp use its AMX/repacked q8_0 kernels")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = model_folder(args.size, root)
        run = runners(folder, root, args.threads, args.amx)
        prompt = list(range(1, 17))
        times: dict = {key: [] for key in run}
        for _ in range(args.trials):
            for key, fn in run.items():
                fn(prompt, 2)  # warm
                start = time.perf_counter()
                fn(prompt, args.new_tokens)
                times[key].append(args.new_tokens / (time.perf_counter() - start))
        params = GPTConfig.load(folder).num_params()
    base = statistics.median(times[("gptforge", "f32")])
    print(
        f"\n{args.size} ({params / 1e6:.1f}M parameters), batch 1, {args.new_tokens} new tokens, {args.threads} "
        f"threads, {cpu_name()} "
        f"({platform.machine()}), torch {torch.__version__}, median of {args.trials}\n"
    )
    print("| runtime | weights | tokens/s | vs gptforge |\n| --- | --- | ---: | ---: |")
    for (runtime, type), values in times.items():
        speed = statistics.median(values)
        print(f"| {runtime} | {type} | {speed:,.1f} | {speed / base:.2f}x |")


if __name__ == "__main__":
    main()
