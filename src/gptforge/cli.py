"""The `gptforge` command. Thin: it parses arguments and calls the modules."""
from __future__ import annotations

import argparse
import os
import sys

from . import __version__


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


# --- info -------------------------------------------------------------------------------------------


def cmd_info(args: argparse.Namespace) -> int:
    from .checkpoint import model_info
    from .config import PRESETS, preset

    if args.model in PRESETS and not os.path.exists(args.model):
        config = preset(args.model)
        info = {"path": f"preset {args.model!r} (not saved)", "config": config, "params": config.num_params(),
                "non_embedding_params": config.num_params(non_embedding=True), "files": {}}
    else:
        info = model_info(args.model)
    c = info["config"]
    print(f"model: {info['path']}")
    print(f"parameters: {info['params']:,} ({_human(info['params'])}); non-embedding {info['non_embedding_params']:,}")
    print(f"vocab_size={c.vocab_size} n_positions={c.n_positions} n_embd={c.n_embd} n_layer={c.n_layer} "
          f"n_head={c.n_head} n_inner={c.mlp_width} activation={c.activation_function}")
    print(f"dropout: resid={c.resid_pdrop} embd={c.embd_pdrop} attn={c.attn_pdrop}; "
          f"bos={c.bos_token_id} eos={c.eos_token_id}")
    for name, size in info["files"].items():
        print(f"  {name:32s} {size:>14,} bytes")
    return 0


def cmd_create(args: argparse.Namespace) -> int:
    from .checkpoint import save_model
    from .config import preset
    from .model import GPT
    import torch

    torch.manual_seed(args.seed)
    overrides = {k: getattr(args, k) for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head") if getattr(args, k)}
    model = GPT(preset(args.preset, **overrides))
    save_model(model, args.out)
    print(f"wrote a randomly initialised {args.preset!r} model ({_human(model.num_params())} parameters) to {args.out}")
    return 0


# --- parser -------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptforge", description="Train GPT-2 language models on your own text.")
    parser.add_argument("--version", action="version", version=f"gptforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("info", help="show a model's config, parameter count and files")
    p.add_argument("model", help="model folder, weights file, preset name or hub id")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("create", help="write a randomly initialised model folder from a preset")
    p.add_argument("preset", help="preset name (gpt2, gpt2-medium, gpt2-large, gpt2-xl, tiny, mini, small)")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--seed", type=int, default=0)
    for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=int, default=None, help=f"override {name}")
    p.set_defaults(func=cmd_create)

    # Each stage adds its own commands below, in the order of the pipeline.
    # -- tokenizer / prepare (tokenizer.py, data.py) --
    # -- train / demo (train.py) --
    # -- generate / eval (generate.py, evaluate.py) --
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from .checkpoint import CheckpointError
    from .config import ConfigError

    try:
        return args.func(args)
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError) as e:
        print(f"gptforge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
