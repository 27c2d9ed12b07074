"""The commands about model folders themselves: info, create, export, merge, quantize."""

from __future__ import annotations

import argparse

from ..options import ExportOptions, MergeOptions, QuantizeOptions
from ..options.flags import add_dataclass_options, option_values


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def cmd_info(args: argparse.Namespace) -> int:
    if args.model is None or args.calibrate:
        return _machine_info(args.calibrate)
    from ..checkpoint import model_info
    from ..config import is_preset, resolve_config

    if is_preset(args.model):
        config = resolve_config(args.model)
        info = {
            "path": f"preset {args.model!r} (not saved)",
            "config": config,
            "params": config.num_params(),
            "non_embedding_params": config.num_params(non_embedding=True),
            "files": {},
        }
    else:
        info = model_info(args.model)
    c = info["config"]
    print(f"model: {info['path']}")
    print(f"parameters: {info['params']:,} ({_human(info['params'])}); non-embedding {info['non_embedding_params']:,}")
    print(
        f"vocab_size={c.vocab_size} n_positions={c.n_positions} n_embd={c.n_embd} n_layer={c.n_layer} "
        f"n_head={c.n_head} n_inner={c.mlp_width} activation={c.activation_function}"
    )
    print(
        f"dropout: resid={c.resid_pdrop} embd={c.embd_pdrop} attn={c.attn_pdrop}; "
        f"bos={c.bos_token_id} eos={c.eos_token_id}"
    )
    for name, size in info["files"].items():
        print(f"  {name:32s} {size:>14,} bytes")
    return 0


def _machine_info(measure: bool) -> int:
    """This machine's CPU paths: processor, instruction-set level, decoding kernel, measured choices."""
    from .. import calibrate
    from ..inference import fastdecode, native

    calibrate.MEASURES.setdefault("steps", fastdecode.measure_steps)  # as importing fastdecode (and kernels) did
    if measure:
        print(f"measuring ({', '.join(sorted(calibrate.MEASURES))}) ...", flush=True)
        calibrate.measure_all()
    print("\n".join(native.describe() + calibrate.describe()))
    return 0


def cmd_create(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint import save_model
    from ..config import preset
    from ..fsio import atomic_dir, check_out_folder
    from ..model import GPT

    check_out_folder(args.out, args.force)
    overrides = {
        k: getattr(args, k)
        for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
        if getattr(args, k) is not None
    }
    config = preset(args.preset, **overrides)  # validated before anything is allocated or written
    torch.manual_seed(args.seed)
    model = GPT(config)
    with atomic_dir(args.out) as tmp:  # a crash leaves no half-written folder that looks complete
        save_model(model, tmp)
    print(f"wrote a randomly initialised {args.preset!r} model ({_human(model.num_params())} parameters) to {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..export import export_model

    out = export_model(args.run, args.out, **option_values(args, ExportOptions))
    what = "model files" if args.format == "transformers" else f"{args.format} {args.type or 'f32'}"
    print(f"exported the model of {args.run} to {out} ({what} and README.md; no data, checkpoints or trainer state)")
    print(f"upload it with the Hugging Face CLI: hf upload USER/NAME {out} .")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from ..checkpoint import quantize_folder

    out = quantize_folder(args.model, args.out, **option_values(args, QuantizeOptions))
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote the int8 model folder {out} ({size / 1e6:.1f} MB)")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from ..checkpoint import merge_to_folder

    out = merge_to_folder(args.base, args.adapter, args.out, **option_values(args, MergeOptions))
    print(
        f"wrote {out}: {args.base} with the adapter {args.adapter} merged in (a plain model folder, no adapter code "
        "needed)"
    )
    return 0


def add_model_commands(sub) -> None:
    p = sub.add_parser(
        "info",
        help="show a model's config, parameter count and files; without one, this machine's "
        "CPU paths (processor, instruction set, decoding kernel, measured choices)",
    )
    p.add_argument("model", nargs="?", default=None, help="model folder, weights file, preset name or hub id")
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="measure again which CPU paths are fastest here, store and show them (docs/performance.md)",
    )
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("create", help="write a randomly initialised model folder from a preset")
    p.add_argument("preset", help="preset name (gpt2, gpt2-medium, gpt2-large, gpt2-xl, tiny, mini, small)")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace --out if it already holds files")
    for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=int, default=None, help=f"override {name}")
    p.set_defaults(func=cmd_create)

    p = sub.add_parser(
        "export",
        help="copy a run's model, without its data and checkpoints, with a model card",
        description="Write the model files of a run (config, weights, generation config, tokenizer) and "
        "a README.md model card into a new folder, ready for `hf upload`. The run's data/, "
        "checkpoints/ and trainer state are left out: they hold the training text.",
    )
    p.add_argument("run", help="run folder (or RUN/best, RUN/checkpoints/step-N)")
    p.add_argument("out", help="folder to write")
    add_dataclass_options(p, ExportOptions)
    p.set_defaults(func=cmd_export)


def add_convert_commands(sub) -> None:
    p = sub.add_parser(
        "merge",
        help="merge a LoRA adapter into its base model: a plain model folder",
        description="Fold the adapter's low-rank updates into the base model's weights and write a model "
        "folder that gptforge and transformers open without any adapter code.",
    )
    p.add_argument("base", help="the base model folder or hub id the adapter was trained on")
    p.add_argument(
        "adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors, from gptforge or peft)"
    )
    p.add_argument("--out", required=True, help="folder to write")
    add_dataclass_options(p, MergeOptions)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser(
        "quantize",
        help="write an int8 copy of a model folder, for faster generation on CPUs",
        description="Store the linear layers and the output head with int8 weights (one scale per "
        "output channel). The folder opens in gptforge (generate, eval, serve, GPTForge) "
        "but not in transformers: keep the fp32 folder to share.",
    )
    p.add_argument("model", help="fp32 model folder or hub id")
    p.add_argument("--out", required=True, help="folder to write")
    add_dataclass_options(p, QuantizeOptions)
    p.set_defaults(func=cmd_quantize)
