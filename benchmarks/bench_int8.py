"""int8 and fp32 generation against CTranslate2 and transformers, in one interleaved run; and int8 quality.

Speed: `gpt2`-shaped random weights (124M) saved by gptforge, opened by transformers' GPT2LMHeadModel and
converted by CTranslate2's `ct2-transformers-converter` (float32 and int8), with a stand-in 50,257-token
vocabulary (CTranslate2 wants token strings; every engine here is fed token ids). Five engines: gptforge
fp32, gptforge int8 (`quantize_model`, made on load), transformers (fp32, KV cache), CTranslate2 float32
and int8. Each trial runs every engine once, each in a fresh process of its own (CTranslate2 brings its
own OpenMP runtime, which slows torch's threads when both share a process), in a rotated order, so load
from other jobs falls on all alike; the table gives medians. Greedy decoding with no early stop: a `--prompt-tokens`
prompt and
`--new-tokens` new tokens per row at batch 1 and 8 (tokens/s = all new tokens / the whole call), and time
to first token for a `--ttft-tokens` prompt at batch 1 (a call that makes one token). Before timing, the
script checks that gptforge fp32 gives transformers' greedy tokens and reports how far int8 agrees.

    pip install 'gptforge[bench]'      # transformers, ctranslate2
    python benchmarks/bench_int8.py [--trials 3] [--threads N] [--isa native|avx2]
    python benchmarks/bench_int8.py --quality RUN_DIR   # a trained run folder of `gptforge train` (model + data/)

Quality: validation perplexity of the trained model (every token of its prepared val split) in fp32 and
int8, and greedy agreement over 200 tokens from prompts taken from the validation tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import add_isa_argument, cpu_name, level_line, paths_line, use_isa

from gptforge import GPT, preset, save_model
from gptforge.generate import generate_ids
from gptforge.inference.quantize import quantize_model

ENGINES = ("gptforge fp32", "gptforge int8", "transformers", "CTranslate2 fp32", "CTranslate2 int8")


def write_stand_in_vocab(folder: Path, size: int) -> None:
    """vocab.json / merges.txt of `size` made-up tokens, the last one <|endoftext|>, for the converter."""
    vocab = {f"t{i}": i for i in range(size - 1)} | {"<|endoftext|>": size - 1}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    eos = "<|endoftext|>"
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "GPT2Tokenizer", "bos_token": eos, "eos_token": eos, "unk_token": eos})
    )


def convert(folder: Path, out: Path, quantization: str) -> None:
    """CTranslate2's converter through this Python (its module: no venv's bin/ needed on PATH)."""
    cmd = [
        sys.executable,
        "-m",
        "ctranslate2.converters.transformers",
        "--model",
        str(folder),
        "--output_dir",
        str(out),
        "--quantization",
        quantization,
    ]
    subprocess.run(cmd, check=True, capture_output=True)


def prepare(work: Path) -> None:
    """The `gpt2`-shaped random model saved by gptforge, and its two CTranslate2 conversions."""
    torch.manual_seed(0)
    folder = work / "gpt2"
    save_model(GPT(preset("gpt2")).eval(), folder)
    write_stand_in_vocab(folder, preset("gpt2").vocab_size)
    for kind, quant in (("fp32", "float32"), ("int8", "int8")):
        convert(folder, work / f"ct2-{kind}", quant)


class Engines:
    """The generators named (default: all five) behind one call: `run(name, prompt ids (B, T), new tokens) ->
    new ids (B, new)`, loaded from the folders `prepare` wrote."""

    def __init__(self, work: Path, threads: int, names=ENGINES):
        from gptforge.checkpoint import load_model

        folder = work / "gpt2"
        if any(n.startswith("gptforge") for n in names):
            self.fp32 = load_model(folder).eval()
            self.int8 = quantize_model(self.fp32, inplace=False)
        self.versions = ""
        if "transformers" in names:
            import transformers

            transformers.logging.set_verbosity_error()
            transformers.utils.logging.disable_progress_bar()
            self.hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
            self.versions += f"transformers {transformers.__version__}"
        self.ct2 = {}
        if any(n.startswith("CTranslate2") for n in names):
            import ctranslate2

            for kind, quant in (("fp32", "float32"), ("int8", "int8")):
                if f"CTranslate2 {kind}" in names:
                    self.ct2[kind] = ctranslate2.Generator(
                        str(work / f"ct2-{kind}"),
                        device="cpu",
                        compute_type=quant,
                        inter_threads=1,
                        intra_threads=threads,
                    )
            self.versions += f", CTranslate2 {ctranslate2.__version__}"

    @torch.inference_mode()
    def run(self, name: str, prompt: torch.Tensor, new: int) -> list[list[int]]:
        if name.startswith("gptforge"):
            model = self.fp32 if name.endswith("fp32") else self.int8
            return generate_ids(model, prompt, do_sample=False, max_new_tokens=new, eos_id=None, batch_size=len(prompt))
        if name == "transformers":
            out = self.hf.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=False,
                max_new_tokens=new,
                min_new_tokens=new,
                pad_token_id=0,
            )
            return out[:, prompt.size(1) :].tolist()
        gen = self.ct2[name.split()[-1]]
        tokens = [[f"t{i}" for i in row] for row in prompt.tolist()]
        res = gen.generate_batch(
            tokens, max_length=new, min_length=new, sampling_topk=1, beam_size=1, include_prompt_in_result=False
        )
        return [r.sequences_ids[0] for r in res]


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of rows' tokens that match before their first difference, over all rows."""
    same = sum(next((i for i, (x, y) in enumerate(zip(r, s)) if x != y), len(r)) for r, s in zip(a, b))
    return same / sum(map(len, a))


def prompts_of(args, vocab: int) -> dict:
    """The timed prompts, the same in every process: batch 1 and 8 of --prompt-tokens, and the TTFT prompt."""
    rand = lambda shape, seed: torch.randint(1, vocab - 1, shape, generator=torch.Generator().manual_seed(seed))
    return {
        1: rand((1, args.prompt_tokens), 1),
        8: rand((8, args.prompt_tokens), 8),
        "ttft": rand((1, args.ttft_tokens), 99),
    }


def time_one(args, work: Path, name: str, threads: int) -> dict:
    """One trial of one engine, alone in this process: a warm-up call (packs weights, allocates), then the
    batch-1, batch-8 and TTFT calls; seconds per call."""
    engines = Engines(work, threads, [name])
    prompts = prompts_of(args, preset("gpt2").vocab_size)
    engines.run(name, prompts[1], 4)
    times = {}
    for key, new in ((1, args.new_tokens), (8, args.new_tokens), ("ttft", 1)):
        start = time.perf_counter()
        engines.run(name, prompts[key], new)
        times[str(key)] = time.perf_counter() - start
    return times


def read_rate(model) -> tuple[float, int]:
    """Bytes per second `torch.sum` reads over the model's matrices (best of 5), and the bytes of fp32 weights a
    decoding step reads (every matrix but the position table: the head reads all of the tied token table)."""
    matrices = [p for name, p in model.named_parameters() if p.dim() == 2 and "wpe" not in name]
    size = sum(p.numel() * p.element_size() for p in matrices)
    best = float("inf")
    with torch.no_grad():
        for _ in range(5):
            start = time.perf_counter()
            for p in matrices:
                p.sum()
            best = min(best, time.perf_counter() - start)
    return size / best, size


def speed(args, work: Path, threads: int) -> None:
    engines = Engines(work, threads)
    print(engines.versions, flush=True)
    prompts = prompts_of(args, engines.fp32.config.vocab_size)
    ref = engines.run("transformers", prompts[8], 20)
    assert engines.run("gptforge fp32", prompts[8], 20) == ref, "gptforge fp32 greedy tokens differ from transformers"
    checks = {name: agreement(ref, engines.run(name, prompts[8], 20)) for name in ENGINES[1:] if name != "transformers"}
    print(
        "greedy agreement with transformers over 20 tokens, 8 rows: gptforge fp32 100% (identical), "
        + ", ".join(f"{k} {v:.0%}" for k, v in checks.items()),
        flush=True,
    )
    rate, weight_bytes = read_rate(engines.fp32)
    del engines
    # Timing: each engine in a process of its own, so that no engine's OpenMP runtime (CTranslate2 brings its
    # own) slows another's; the trials rotate the order so that drifting load falls on all alike.
    times: dict[tuple, list[float]] = {}
    for trial in range(args.trials):
        order = ENGINES[trial % len(ENGINES) :] + ENGINES[: trial % len(ENGINES)]
        for name in order:
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                name,
                "--work",
                str(work),
                "--threads",
                str(threads),
                "--new-tokens",
                str(args.new_tokens),
                "--prompt-tokens",
                str(args.prompt_tokens),
                "--ttft-tokens",
                str(args.ttft_tokens),
            ]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            for key, seconds in json.loads(out.strip().splitlines()[-1]).items():
                times.setdefault((int(key) if key.isdigit() else key, name), []).append(seconds)
        last = ", ".join(f"{k[1]} b{k[0]} {v[-1]:.2f}s" for k, v in times.items())
        print(
            f"trial {trial + 1}/{args.trials}, load average {os.getloadavg()[0]:.1f}: {last}",
            file=sys.stderr,
            flush=True,
        )
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"\n{args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, greedy, medians of {args.trials} "
        f"interleaved trials; TTFT: {args.ttft_tokens}-token prompt, batch 1\n"
    )
    print("| | " + " | ".join(ENGINES) + " |")
    print("| --- " * (len(ENGINES) + 1) + "|")
    for b in (1, 8):
        print(
            f"| batch {b}, tokens/s | " + " | ".join(f"{b * args.new_tokens / med[(b, n)]:.1f}" for n in ENGINES) + " |"
        )
    print("| TTFT, ms | " + " | ".join(f"{med[('ttft', n)] * 1e3:.0f}" for n in ENGINES) + " |")
    bound = rate / weight_bytes
    fp32_b1 = args.new_tokens / med[(1, "gptforge fp32")]
    print(
        f"\nmemory read rate (torch.sum over the fp32 weights, best of 5): {rate / 1e9:.1f} GB/s; a batch-1 token "
        f"reads {weight_bytes / 1e6:.0f} MB of fp32 weights, so at most {bound:.1f} tokens/s; gptforge fp32 at "
        f"batch 1: {fp32_b1:.1f} tokens/s, {fp32_b1 / bound:.0%} of that (prompt included)"
    )
    print(
        "\nratios (same run): "
        + "; ".join(
            f"batch {b}: int8 / CTranslate2 int8 {med[(b, 'CTranslate2 int8')] / med[(b, 'gptforge int8')]:.2f}x, "
            f"fp32 / CTranslate2 fp32 {med[(b, 'CTranslate2 fp32')] / med[(b, 'gptforge fp32')]:.2f}x, "
            f"fp32 / transformers {med[(b, 'transformers')] / med[(b, 'gptforge fp32')]:.2f}x"
            for b in (1, 8)
        )
    )


def quality(run_dir: Path, new_tokens: int = 200, n_prompts: int = 16) -> None:
    from gptforge.checkpoint import load_model
    from gptforge.data import load_split
    from gptforge.evaluate import evaluate_prepared

    fp32 = load_model(run_dir)
    int8 = quantize_model(fp32, inplace=False)
    res = {name: evaluate_prepared(m, run_dir / "data", split="val") for name, m in (("fp32", fp32), ("int8", int8))}
    val = load_split(run_dir / "data", "val")
    starts = torch.linspace(0, len(val) - 64, n_prompts).long().tolist()
    prompts = [[int(t) for t in val[s : s + 32]] for s in starts]
    kw = {"do_sample": False, "max_new_tokens": new_tokens, "eos_id": None, "batch_size": 1}
    a, b = generate_ids(fp32, prompts, **kw), generate_ids(int8, prompts, **kw)
    first = [next((i for i, (x, y) in enumerate(zip(r, s)) if x != y), len(r)) for r, s in zip(a, b)]
    per_pos = sum(x == y for r, s in zip(a, b) for x, y in zip(r, s)) / sum(map(len, a))
    print(f"\nmodel {run_dir} ({fp32.num_params() / 1e6:.2f}M parameters), validation split: {len(val):,} tokens")
    print("| | fp32 | int8 | int8 / fp32 |\n| --- | --- | --- | --- |")
    p32, p8 = res["fp32"].perplexity, res["int8"].perplexity
    print(f"| validation perplexity | {p32:.3f} | {p8:.3f} | {p8 / p32:.4f} ({(p8 / p32 - 1) * 100:+.2f}%) |")
    print(f"| bits per byte | {res['fp32'].bits_per_byte:.4f} | {res['int8'].bits_per_byte:.4f} | |")
    print(
        f"\ngreedy, {len(prompts)} prompts of 32 validation tokens, {new_tokens} new tokens each: "
        f"{sum(f == new_tokens for f in first)}/{len(prompts)} rows identical throughout; tokens before the first "
        f"difference {sum(first) / sum(map(len, a)):.1%} of all; same token at the same position {per_pos:.1%}; "
        f"first differences at {sorted(first)}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--ttft-tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, help="threads for every engine (default: torch's choice)")
    ap.add_argument("--quality", type=Path, help="a trained run folder: int8 quality instead of speed")
    ap.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)  # time one engine alone (internal)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    add_isa_argument(ap)
    args = ap.parse_args()
    use_isa(args.isa)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    if args.worker:
        print(json.dumps(time_one(args, args.work, args.worker, threads)))
        return
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__} ({threads} threads), "
        f"python {platform.python_version()}, load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    print(f"{level_line()}\n{paths_line()}", flush=True)
    if args.quality:
        quality(args.quality)
        return
    with tempfile.TemporaryDirectory() as tmp:
        prepare(Path(tmp))
        speed(args, Path(tmp), threads)


if __name__ == "__main__":
    main()
