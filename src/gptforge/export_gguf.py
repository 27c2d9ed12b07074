"""`gptforge export RUN OUT --format gguf`: one GGUF file that llama.cpp opens as its `gpt2` architecture.

Written with the `gguf` library (llama.cpp's own writer). The layout is the one llama.cpp's converter gives a
transformers GPT-2: tensors `token_embd`, `position_embd`, `blk.N.{attn_norm,attn_qkv,attn_output,ffn_norm,
ffn_up,ffn_down}`, `output_norm` (and `output` when the head is not tied), each matrix as (out, in) -- the
layout of our `nn.Linear`, so nothing is transposed -- and the `gpt2.*` hyper-parameters. Norms, biases and
the position embeddings stay f32 whatever `--type` says, as llama.cpp's converter keeps them.

llama.cpp does not run the tokenizer.json: it re-implements a few pre-tokenizers and picks one by the name
`tokenizer.ggml.pre`. GPT-2's byte-level BPE with GPT-2's split regex is "gpt-2"; a tokenizer that splits or
normalizes otherwise, or a character vocabulary, would tokenize differently there, so it is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ConfigError, OptionError, TokenizerError

TYPES = ("f32", "f16", "q8_0")
FILE = "model.gguf"
# GPT-2's tanh approximation of GELU: the only activation llama.cpp's gpt2 graph computes
_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
# our parameter names (after `transformer.`) -> llama.cpp's tensor names
_NAMES = {
    "wte.weight": "token_embd.weight",
    "wpe.weight": "position_embd.weight",
    "ln_f.weight": "output_norm.weight",
    "ln_f.bias": "output_norm.bias",
}
_BLOCK = {
    "ln_1": "attn_norm",
    "attn.c_attn": "attn_qkv",
    "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm",
    "mlp.c_fc": "ffn_up",
    "mlp.c_proj": "ffn_down",
}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise OptionError(
            "--format gguf needs the gguf package (llama.cpp's writer): pip install 'gptforge[gguf]'"
        ) from None
    return gguf


def gguf_name(name: str) -> str:
    """llama.cpp's name for one of our parameters (`transformer.h.3.attn.c_attn.weight` -> `blk.3.attn_qkv.weight`)."""
    if name == "lm_head.weight":
        return "output.weight"
    name = name.removeprefix("transformer.")
    if name in _NAMES:
        return _NAMES[name]
    _, layer, rest = name.split(".", 2)  # h.3.attn.c_attn.weight
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_BLOCK[module]}.{kind}"


def tokenizer_problem(tok) -> str | None:
    """Why llama.cpp's "gpt-2" pre-tokenizer would not give this tokenizer's ids, or None when it would."""
    if tok.kind != "bpe":
        return "a character vocabulary; llama.cpp reads byte-level BPE vocabularies only"
    spec = json.loads(tok.hf_tokenizer.to_str())
    pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
        pre = pre["pretokenizers"][0]
    if spec.get("normalizer") is not None:
        kind = spec["normalizer"].get("type")
        return f"it normalizes text first ({kind}), which llama.cpp's GPT-2 tokenizer does not"
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True):
        return (
            f"its pre-tokenizer ({pre.get('type')}) is not GPT-2's byte-level split, the one llama.cpp's \"gpt-2\" "
            "pre-tokenizer reproduces"
        )
    if pre.get("add_prefix_space"):
        return "it adds a space before the text (add_prefix_space), which llama.cpp's GPT-2 tokenizer does not"
    if (
        model.get("dropout")
        or model.get("continuing_subword_prefix")
        or model.get("end_of_word_suffix")
        or model.get("byte_fallback")
    ):
        return "its BPE uses dropout, subword prefixes/suffixes or byte fallback, which llama.cpp's GPT-2 BPE does not"
    return None


def _vocab(gguf, tok, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens in id order (padded to the model's vocabulary with unused ones) and their llama.cpp types."""
    hf = tok.hf_tokenizer
    by_id = {i: t for t, i in hf.get_vocab(with_added_tokens=True).items()}
    added = {a.content: a.special for a in hf.get_added_tokens_decoder().values()}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            types.append(
                gguf.TokenType.NORMAL
                if token not in added
                else gguf.TokenType.CONTROL
                if added[token]
                else gguf.TokenType.USER_DEFINED
            )
    return tokens, types


def _add_tokenizer(gguf, writer, tok, vocab_size: int, chat_template: str | None) -> None:
    tokens, types = _vocab(gguf, tok, vocab_size)
    merges = json.loads(tok.hf_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tok.bos_id)
    writer.add_eos_token_id(tok.eos_id)
    writer.add_add_bos_token(False)  # gptforge, like GPT-2, encodes a prompt without a leading <|endoftext|>
    writer.add_add_eos_token(False)
    if chat_template:
        writer.add_chat_template(chat_template)


def _tensor_type(gguf, name: str, array, type: str):
    """The array to write and its GGML type: matrices in `type`, everything else f32 (as llama.cpp's converter);
    a matrix whose rows do not split into q8_0's blocks of 32 falls back to f16 (as there too)."""
    import numpy as np

    q = gguf.GGMLQuantizationType
    if array.ndim < 2 or name.startswith("position_embd") or type == "f32":
        return array.astype(np.float32), q.F32
    if type == "q8_0":
        try:
            return gguf.quants.quantize(array.astype(np.float32), q.Q8_0), q.Q8_0
        except gguf.QuantError:
            pass
    return array.astype(np.float16), q.F16


def write_gguf(folder: str | Path, path: str | Path, type: str = "f32", name: str | None = None) -> Path:
    """Write the model folder `folder` (config, weights, tokenizer) as the GGUF file `path`, its matrices in
    `type` (f32, f16 or q8_0). Refuses, in one line, what llama.cpp's gpt2 would compute differently."""
    gguf = _gguf()
    from .checkpoint import load_model
    from .tokenizer import check_vocab_fits, load_tokenizer

    folder, path = Path(folder), Path(path)
    if type not in TYPES:
        raise OptionError(f"--type {type}: GGUF exports take {', '.join(TYPES)}")
    model = load_model(folder)
    c = model.config
    if c.activation_function not in _ACTIVATIONS:
        raise ConfigError(
            f"{folder / 'config.json'}: activation_function {c.activation_function!r}; llama.cpp's gpt2 "
            "computes GPT-2's tanh GELU (gelu_new) only; export --format onnx or ct2 instead"
        )
    tok = load_tokenizer(folder)
    check_vocab_fits(tok, c.vocab_size, f"the model {folder}")
    problem = tokenizer_problem(tok)
    if problem:
        raise TokenizerError(
            f"{folder / 'tokenizer.json'}: llama.cpp cannot reproduce this tokenizer: {problem}; "
            "export --format onnx or ct2 instead"
        )
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[type]
    writer = gguf.GGUFWriter(path, "gpt2")
    writer.add_name(name or folder.resolve().name)
    writer.add_context_length(c.n_positions)
    writer.add_embedding_length(c.n_embd)
    writer.add_feed_forward_length(c.mlp_width)
    writer.add_block_count(c.n_layer)
    writer.add_head_count(c.n_head)
    writer.add_layer_norm_eps(c.layer_norm_epsilon)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    template = folder / "chat_template.jinja"
    template = template.read_text(encoding="utf-8") if template.is_file() else None
    _add_tokenizer(gguf, writer, tok, c.vocab_size, template)
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and c.tie_word_embeddings:
            continue  # llama.cpp uses token_embd for a missing output
        target = gguf_name(key)
        data, kind = _tensor_type(gguf, target, tensor.detach().float().numpy(), type)
        writer.add_tensor(target, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def card_lines(type: str, context: int) -> tuple[str, list[str]]:
    """What the export is and how to run it (within its `context` of positions), for the model card."""
    kept = {
        "f32": "f32 weights, as trained",
        "f16": "f16 matrices (norms, biases and positions f32)",
        "q8_0": "q8_0 matrices, 8 bits per weight in blocks of 32 (norms, biases and positions f32)",
    }[type]
    what = (
        f"`{FILE}`: the model and its tokenizer in one GGUF file ({kept}) for llama.cpp, which runs it as its "
        "`gpt2` architecture with the tokenizer's `gpt-2` pre-tokenizer. Exported with `gptforge export RUN OUT "
        f"--format gguf --type {type}`."
    )
    n = min(100, context // 2)
    use = [
        "```bash",
        f'llama-cli -m {FILE} -c {context} -p "Once upon a time" -n {n} --temp 0.8',
        "```",
        "",
        f"(`-c {context}`: the model has no positions past its context), or from Python with llama-cpp-python:",
        "",
        "```python",
        "from llama_cpp import Llama",
        "",
        f'llm = Llama("{FILE}", n_ctx={context})',
        f'print(llm("Once upon a time", max_tokens={n})["choices"][0]["text"])',
        "```",
    ]
    return what, use


__all__ = ["FILE", "TYPES", "card_lines", "gguf_name", "tokenizer_problem", "write_gguf"]
