"""Model folders that transformers reads and writes, and the training checkpoints of a run.

A model folder holds `config.json` (GPT2Config), `model.safetensors` (GPT2LMHeadModel key names,
Conv1D layout: c_attn / c_proj / c_fc weights stored (in, out)), `generation_config.json`, and the
tokenizer files when a tokenizer is attached. Loading also accepts what transformers and older tools
write: keys with or without the `transformer.` prefix, with or without `lm_head.weight`, the old
`attn.bias` / `attn.masked_bias` buffers, sharded safetensors with an index, and `pytorch_model.bin`.

A run's checkpoints are model folders under `checkpoints/step-NNNNNNN/` with the training state
(`trainer_state.pt`: optimizer, step, RNG, clock) beside the weights, each written under a temporary
name and renamed, so an interrupted save never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import BLOCK_KEY, GPTConfig, check_block_count
from .errors import CheckpointError, NotFoundError, OptionError
from .fsio import atomic_dir, atomic_write, check_out_folder, folder_of
from .model import GPT

WEIGHTS_NAME = "model.safetensors"
# Weights transformers keeps as Conv1D, i.e. transposed relative to nn.Linear.
_CONV1D = re.compile(r"\.(c_attn|c_proj|c_fc)\.weight$")
_BUFFERS = re.compile(r"\.attn\.(bias|masked_bias)$")


# --- state dict conversion ---------------------------------------------------------------


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], tied: bool = True) -> dict[str, torch.Tensor]:
    """Our parameters under GPT2LMHeadModel names and layouts, without `lm_head.weight` when it is tied."""
    out = {}
    for name, t in state_dict.items():
        if name == "lm_head.weight" and tied:
            continue
        t = t.detach()
        out[name] = (t.t() if _CONV1D.search(name) else t).contiguous().cpu()
    return out


def expected_shapes(config: GPTConfig) -> dict[str, tuple]:
    """The shape of every tensor of the model `config` describes, by name, from a model of one block on the meta
    device (building all n_layer blocks of a config to be checked could take minutes)."""
    one = {k: tuple(v.shape) for k, v in GPT.empty(dataclasses.replace(config, n_layer=1)).state_dict().items()}
    shapes = {k: v for k, v in one.items() if not BLOCK_KEY.match(k)}
    block = {m[2]: v for k, v in one.items() if (m := BLOCK_KEY.match(k))}
    shapes.update({f"transformer.h.{i}.{rest}": v for i in range(config.n_layer) for rest, v in block.items()})
    return shapes


def from_hf_state_dict(
    sd: dict[str, torch.Tensor], config: GPTConfig, source: str = "weights"
) -> dict[str, torch.Tensor]:
    """Map any transformers GPT-2 state dict variant onto our names and layouts; check every shape."""
    check_block_count(sd, config, source)
    expected = expected_shapes(config)
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if _BUFFERS.search(name):
            continue  # causal-mask buffers from old transformers versions
        key = name
        if not key.startswith(("transformer.", "lm_head.")):
            key = "transformer." + key  # saved from GPT2Model, without the LM head wrapper
        if key not in expected:
            raise CheckpointError(f"{source}: unexpected tensor {name!r}; is this a GPT-2 checkpoint?")
        need = expected[key]
        if _CONV1D.search(key):
            need = need[::-1]  # shapes as stored: Conv1D (in, out)
        if tuple(t.shape) != need:
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {tuple(t.shape)} but the config needs "
                f"{need} (vocab_size={config.vocab_size}, n_positions={config.n_positions}, "
                f"n_embd={config.n_embd}, n_layer={config.n_layer}, n_inner={config.mlp_width})"
            )
        out[key] = t.t() if _CONV1D.search(key) else t
    head, wte = out.get("lm_head.weight"), out.get("transformer.wte.weight")
    if config.tie_word_embeddings:
        if head is not None and wte is not None and head.data_ptr() != wte.data_ptr() and not torch.equal(head, wte):
            raise CheckpointError(
                f"{source}: lm_head.weight differs from transformer.wte.weight, but the config ties them "
                "(tie_word_embeddings is true); set it to false in config.json if the head is its own matrix"
            )
        out["lm_head.weight"] = wte
    missing = sorted(k for k in expected if k not in out or out[k] is None)
    if missing:
        raise CheckpointError(f"{source}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return out


# --- reading weights -----------------------------------------------------------------------


def _read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: not a plain weights file (torch.load with weights_only=True refused it: it is damaged or "
            "holds Python objects, which are never executed); re-save it as safetensors from a trusted source"
        ) from None
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{path}: cannot read weights ({msg}); the file is damaged or not a weights file"
        ) from None


def weights_files(folder: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            root = folder.resolve()
            for name in shards:  # an index names files of this folder, nothing else
                if Path(name).is_absolute() or root not in (folder / name).resolve().parents:
                    raise CheckpointError(
                        f"{index}: names {name!r}, a file outside the model folder; refusing to read it"
                    )
            return [folder / s for s in shards]
    for name in (WEIGHTS_NAME, "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    if (folder / "adapter_config.json").is_file():  # adapters.CONFIG_NAME
        raise CheckpointError(
            f"{folder}: a LoRA adapter folder, not a model; give it as --adapter with its base model, "
            f"or merge it first (gptforge merge BASE {folder} --out FOLDER)"
        )
    if (folder / "model-int8.safetensors").is_file():  # quantize.WEIGHTS_NAME
        raise CheckpointError(
            f"{folder}: an int8 folder of `gptforge quantize`; this needs the fp32 model it was made from"
        )
    raise CheckpointError(
        f"{folder}: no weights found (looked for model.safetensors, model.safetensors.index.json, pytorch_model.bin)"
    )


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a folder (single file or shards) or of one weights file, as stored."""
    path = Path(path)
    files = weights_files(path) if path.is_dir() else [path]
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: weights file not found")
        sd.update(_read_weights_file(f))
    return sd


# --- hub -----------------------------------------------------------------------------------------


_HUB_GPT2 = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2")


def _looks_like_hub_id(name: str) -> bool:
    return name in _HUB_GPT2 or re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None


def fetch_from_hub(repo_id: str) -> Path:
    """Download a GPT-2 model folder from the Hugging Face hub (only when the user names one)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"{repo_id!r} is not a local folder; downloading it needs huggingface_hub "
            "(pip install 'gptforge[hub]'), or pass the path of a local model folder"
        ) from None
    patterns = ["*.json", "*.safetensors", "merges.txt", "vocab.json", "*.txt"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, proxy: all mean the same to the user
        raise CheckpointError(
            f"could not download {repo_id!r} from the Hugging Face hub ({type(e).__name__}). "
            f"Without network access, download it elsewhere (e.g. `hf download {repo_id} --local-dir DIR`) "
            "and pass the local folder instead"
        ) from None


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """A local folder or weights file as given, or a hub id downloaded to the local cache."""
    path = Path(name_or_path)
    if path.is_file() and path.suffix.lower() in (
        ".txt",
        ".md",
        ".text",
        ".csv",
        ".tsv",
        ".jsonl",
        ".ndjson",
        ".parquet",
    ):
        raise CheckpointError(
            f"{path}: a text file, not a model; give a model folder (a run folder, or one written "
            "by transformers) or its weights file (.safetensors, .bin)"
        )
    if path.exists():
        return path
    # `runs/model` whose `runs/` exists is a mistyped local path, not a hub id to download.
    if _looks_like_hub_id(str(name_or_path)) and not (path.parent != Path(".") and path.parent.is_dir()):
        return fetch_from_hub(str(name_or_path))
    raise CheckpointError(f"{name_or_path}: no such model folder or file")


# --- public API ------------------------------------------------------------------------------------


def load_model(
    name_or_path: str | os.PathLike,
    config: GPTConfig | str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    quantize: str | None = None,
) -> GPT:
    """Load a GPT-2 model from a folder, a weights file (+ `config`), or a hub id.

    `name_or_path` may be a folder written by gptforge or transformers, a single `.safetensors` /
    `pytorch_model.bin` file (its folder's config.json is used unless `config` is given), a hub id
    such as `gpt2` (downloaded with huggingface_hub), or an int8 folder written by `gptforge quantize`.
    `quantize="int8"` gives int8 weights for generation (gptforge.inference.quantize), made on load. `dtype=None` keeps
    the stored dtype, except on a CPU, which computes in fp32.
    """
    path = resolve_model_path(name_or_path)
    folder = folder_of(path)
    if config is None:
        config = GPTConfig.load(folder)
    elif not isinstance(config, GPTConfig):
        config = GPTConfig.load(config)
    if "quantization_config" in config.extra:  # an int8 folder of `gptforge quantize` (quantize.py reads it)
        from .inference.quantize import load_quantized

        model = load_quantized(folder, config)
    else:
        sd = from_hf_state_dict(read_state_dict(path), config, source=str(path))
        model = GPT.empty(config)
        model.load_state_dict(sd, assign=True)
        model.tie_weights()  # assign=True replaced the tied tensor
    model.generation_config = read_generation_config(folder)  # kept when the model is saved again
    if dtype is None and torch.device(device).type == "cpu" and "quantization_config" not in config.extra:
        dtype = torch.float32  # a CPU computes in fp32: fp16 / bf16 weights (--save-dtype, torch_dtype) are widened
    model.to(device=device, dtype=dtype)
    model.eval()
    if quantize:
        from .inference.quantize import quantize_model

        quantize_model(model, quantize)
    return model


def save_model(model: GPT, folder: str | os.PathLike, tokenizer=None, *, state_dict: dict | None = None) -> Path:
    """Write a transformers-compatible model folder (each file replaced atomically).

    `state_dict` replaces `model.state_dict()`, e.g. the full weights gathered from a sharded (FSDP) model, or
    the weights in fp16 / bf16 (`--save-dtype`); config.json records their dtype as transformers' torch_dtype.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    if "quantization_config" in config.extra:  # int8 weights (`gptforge quantize`): a folder only gptforge opens
        from .inference.quantize import save_quantized_weights

        save_quantized_weights(model, folder)
        stored = None
    else:
        weights = to_hf_state_dict(
            state_dict if state_dict is not None else model.state_dict(), tied=model.config.tie_word_embeddings
        )
        atomic_write(folder / WEIGHTS_NAME, lambda p: save_file(weights, str(p), metadata={"format": "pt"}))
        kinds = {v.dtype for v in weights.values() if v.is_floating_point()}
        stored = str(kinds.pop()).removeprefix("torch.") if len(kinds) == 1 else None  # transformers' torch_dtype
    gen = generation_config(model, tokenizer)
    atomic_write(folder / "generation_config.json", lambda p: p.write_text(json.dumps(gen, indent=2) + "\n"))
    if tokenizer is not None:
        tokenizer.save(folder, model_max_length=config.n_positions)
    atomic_write(
        folder / "config.json", lambda p: config.save(p, torch_dtype=stored)
    )  # last: it says what the weights are
    # A stale legacy file would shadow nothing (safetensors wins) but confuses people; leave theirs alone.
    return folder


# generation_config.json entries that are gptforge sampling options of the same name and meaning
GENERATION_KEYS = (
    "max_new_tokens",
    "min_new_tokens",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "no_repeat_ngram_size",
)


def read_generation_config(folder: str | os.PathLike) -> dict:
    """The entries of a folder's generation_config.json ({} when there is none or it is unreadable)."""
    try:
        gen = json.loads((Path(folder) / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return (
        {k: v for k, v in gen.items() if k not in ("transformers_version", "_from_model_config")}
        if isinstance(gen, dict)
        else {}
    )


def generation_config(model: GPT, tokenizer=None) -> dict:
    """generation_config.json of a model folder: gptforge's sampling defaults, so transformers' `generate`
    samples as `gptforge generate` does, under what the folder the model came from already said; the
    model's bos/eos, and the pad token (the tokenizer's, else end of text)."""
    from .options import SamplingOptions

    defaults = SamplingOptions()
    gen = {k: getattr(defaults, k) for k in GENERATION_KEYS}
    gen.update(getattr(model, "generation_config", None) or {})
    gen.update(bos_token_id=model.config.bos_token_id, eos_token_id=model.config.eos_token_id)
    if tokenizer is not None and hasattr(tokenizer, "pad_id"):
        gen["pad_token_id"] = tokenizer.pad_id
    gen.setdefault("pad_token_id", model.config.eos_token_id)
    return gen


def sampling_defaults(model: GPT) -> dict:
    """The sampling options the generation_config.json of a loaded model's folder sets, by SamplingOptions name."""
    gen = getattr(model, "generation_config", None) or {}
    return {k: gen[k] for k in GENERATION_KEYS if gen.get(k) is not None}


def model_info(name_or_path: str | os.PathLike) -> dict:
    """Config, parameter counts and files of a model folder (no weights loaded)."""
    folder = folder_of(resolve_model_path(name_or_path))
    config = GPTConfig.load(folder)
    files = sorted(
        p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
    )  # not locks, temporaries
    return {
        "path": str(folder),
        "config": config,
        "params": config.num_params(),
        "non_embedding_params": config.num_params(non_embedding=True),
        "files": {name: (folder / name).stat().st_size for name in files},
    }


def load_model_and_tokenizer(
    model_path,
    tokenizer_path=None,
    device: str = "auto",
    dtype: torch.dtype | None = None,
    quantize: str | None = None,
    adapter=None,
):
    """The one door: a model folder (or hub id, int8 folder, or adapter folder naming its base) and its tokenizer,
    ready to generate: eval mode, on `device`. Every command, `GPTForge` and the server open models here.

    The tokenizer comes from the model folder (an adapter's own when it has one: its chat template) unless
    `tokenizer_path` names another. `adapter` (a LoRA folder, gptforge's or peft's) is checked, then merged into
    the base in fp32: as fast as the base alone. `dtype=None` keeps fp32 on CPU and uses bf16 weights on a CUDA
    GPU that supports it (decoding is memory-bound). `quantize="int8"`: int8 weights, made on load (after an
    adapter is merged).
    """
    from .adapters import load_adapter, merge_lora, read_adapter, resolve_base
    from .inference.quantize import quantize_model, refuse_quantized
    from .runtime import resolve_device
    from .tokenizer import check_vocab_fits, load_tokenizer

    model_path, adapter = resolve_base(model_path, adapter)
    if adapter is not None:
        read_adapter(adapter)  # a bad adapter fails before the base loads
        if tokenizer_path is None and (Path(adapter) / "tokenizer.json").is_file():
            tokenizer_path = adapter
    dev = resolve_device(device)
    if dtype is None and dev.type == "cuda" and torch.cuda.is_bf16_supported():
        dtype = torch.bfloat16
    path = resolve_model_path(model_path)
    folder = folder_of(path)
    if adapter is None:
        model = load_model(path, device=dev, dtype=dtype, quantize=quantize)
    else:
        model = load_model(path, device=dev, dtype=torch.float32)
        refuse_quantized(
            model.config, model_path, "take an adapter", " (and --quantize int8 to quantize after merging)"
        )
        load_adapter(model, adapter)
        merge_lora(model).to(dtype=dtype).eval()
        if quantize:
            quantize_model(model, quantize)
    try:
        tokenizer = load_tokenizer(tokenizer_path or folder)
    except FileNotFoundError:
        if tokenizer_path is not None:
            raise
        raise NotFoundError(
            f"{folder}: the model folder has no tokenizer (tokenizer.json, or vocab.json + merges.txt); pass "
            "--tokenizer PATH, or attach one for good by saving it into the folder: "
            f"`gptforge.load_tokenizer(PATH).save({str(folder)!r})`"
        ) from None
    check_vocab_fits(tokenizer, model.config.vocab_size, f"the model {folder}")
    return model, tokenizer


def merge_to_folder(base, adapter, out, force: bool = False) -> Path:
    """`gptforge merge`: the base with the adapter folded in, written as a plain model folder (with the tokenizer)."""
    out = check_out_folder(out, force, reads=(base, adapter))
    model, tokenizer = load_model_and_tokenizer(base, adapter=adapter, device="cpu")
    with atomic_dir(out) as tmp:
        save_model(model, tmp, tokenizer)
    return out


def save_trained(model: GPT, folder: str | os.PathLike, tokenizer=None, *, state_dict: dict | None = None) -> Path:
    """What a training run saves: the adapter alone for a model with LoRA layers, else the model folder."""
    from .adapters import has_lora, save_adapter

    if has_lora(model):
        return save_adapter(model, folder, tokenizer, state_dict=state_dict)
    return save_model(model, folder, tokenizer, state_dict=state_dict)


def load_trained(model: GPT, folder: str | os.PathLike) -> None:
    """Put the weights a run saved in `folder` (an adapter folder, or a model folder) back into `model` (resume)."""
    from .adapters import has_lora, load_adapter_weights

    if has_lora(model):
        load_adapter_weights(model, folder)
    else:
        model.load_state_dict(load_model(folder).state_dict())


def quantize_folder(
    model_path: str | os.PathLike, out: str | os.PathLike, method: str = "int8", force: bool = False
) -> Path:
    """`gptforge quantize`: read an fp32 model folder (or hub id) and write its int8 folder, with the
    tokenizer and sampling defaults, to `out` (replaced whole, and only with `force`)."""
    from .inference.quantize import check_method, quantization_of, quantize_model
    from .tokenizer import load_tokenizer

    check_method(method, "--method")
    source = folder_of(resolve_model_path(model_path))
    out = check_out_folder(out, force, reads=(source,))
    if quantization_of(GPTConfig.load(source)) is not None:
        raise OptionError(f"{model_path}: already holds int8 weights; quantize its fp32 folder instead")
    try:
        tokenizer = load_tokenizer(source)
    except FileNotFoundError:
        tokenizer = None  # a folder of weights alone gives an int8 folder of weights alone
    model = quantize_model(load_model(source))
    with atomic_dir(out) as tmp:
        save_model(model, tmp, tokenizer)
    return out


__all__ = [
    "CheckpointError",
    "expected_shapes",
    "load_model",
    "load_model_and_tokenizer",
    "load_trained",
    "merge_to_folder",
    "save_trained",
    "generation_config",
    "model_info",
    "read_generation_config",
    "read_state_dict",
    "sampling_defaults",
    "quantize_folder",
    "save_model",
    "weights_files",
]
