"""`gptforge demo`: the whole journey on text every machine has — the Python standard library's own source.

Tokenizer, data, a few minutes of training, validation perplexity and bits per byte, a sample, and a
model folder that `gptforge generate` and transformers open. A user's own text replaces the default.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

from .errors import NotFoundError
from .options import PREVIEW_SAMPLING
from .train.loop import TrainResult
from .train.pipeline import run_training


def stdlib_files(max_bytes: int = 6_000_000) -> list[Path]:
    """The running interpreter's standard-library `.py` files (no site-packages, no tests, no `encodings`:
    its generated codec tables would fill the samples), up to `max_bytes` of text: a fixed pseudo-random choice over
    the whole library (by a hash of each relative
    path, so every machine with the same Python picks the same files), returned sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "dist-packages", "test", "tests", "idle_test", "encodings")
    candidates = [p for p in root.rglob("*.py") if not any(part in skip for part in p.relative_to(root).parts)]
    candidates.sort(key=lambda p: hashlib.blake2b(str(p.relative_to(root)).encode(), digest_size=8).digest())
    files, total = [], 0
    for path in candidates:
        size = path.stat().st_size
        if size == 0 or total + size > max_bytes:
            continue
        files.append(path)
        total += size
    if not files:
        raise NotFoundError(f"{root}: no standard-library .py files found; pass your own text to `gptforge demo`")
    return sorted(files)


def demo(
    inputs: list[str] | None = None,
    *,
    out_dir: str = "demo-model",
    minutes: float = 3.0,
    prompt: str = "def ",
    overwrite: bool = False,
    **options,
) -> TrainResult:
    """Train a small model on `inputs` (default: the standard library's source) for `minutes`."""
    from .checkpoint import load_model
    from .generate import generate
    from .tokenizer import load_tokenizer

    if inputs:
        print(f"[1/4] corpus: {', '.join(map(str, inputs))}")
    else:
        files = stdlib_files()
        size = sum(f.stat().st_size for f in files)
        print(
            f"[1/4] corpus: {len(files)} files of the Python standard library ({size / 1e6:.1f} MB), no download needed"
        )
        inputs = [str(f) for f in files]
    print(f"[2/4] tokenizer, data and training for {minutes:g} minutes -> {out_dir}")
    options.setdefault("block_size", 128)
    options.setdefault("eval_interval", 100)
    options.setdefault("eval_tokens", 1 << 15)  # a progress estimate every 100 steps; the final evaluation uses all
    result = run_training(
        inputs, out_dir=out_dir, max_time=minutes * 60, overwrite=overwrite, sample_prompt=prompt, **options
    )
    print("[3/4] result")
    if result.val_loss is not None:
        print(
            f"  validation loss {result.val_loss:.4f} nats/token, perplexity {result.val_perplexity:.2f}, "
            f"{result.val_bits_per_byte:.3f} bits per byte after {result.step} steps"
        )
    model, tok = load_model(out_dir), load_tokenizer(out_dir)
    text = generate(model, tok, prompt, max_new_tokens=120, seed=0, **PREVIEW_SAMPLING)[0]
    print(f"[4/4] a sample from the saved model (prompt {prompt!r}):\n{text}\n")
    print(
        f"model folder: {out_dir}\n"
        f"  gptforge generate {out_dir} --prompt {prompt!r}\n"
        f"  gptforge eval {out_dir} FILE\n"
        f"  transformers: AutoModelForCausalLM.from_pretrained({out_dir!r})"
    )
    return result
