"""`gptforge export RUN OUT --format gguf|onnx|ct2`: files other runtimes open, read back and decoded there."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest

from gptforge.cli import build_parser, main
from gptforge.errors import ConfigError, OptionError, TokenizerError
from gptforge.export import FORMATS, export_model

PROBE = "The cake needs flour, sugar & 3 eggs.  Bake it at 180°C -- or don't!\n\nÉclair? 蛋糕 🙂 it's   done\t"
STEPS = 20


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run trained long enough that its greedy tokens vary (a model that repeats one token checks little)."""
    from gptforge.train.pipeline import run_training

    rng = random.Random(3)
    root = tmp_path_factory.mktemp("formats")
    words = "the cake needs flour sugar eggs and butter, mixed slowly then baked until golden at 180 degrees".split()
    (root / "recipes.txt").write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(16)) for _ in range(300)))
    run_training(
        [str(root / "recipes.txt")],
        out_dir=str(root / "run"),
        size="tiny",
        vocab_size=320,
        block_size=32,
        max_steps=40,
        batch_size=8,
        eval_interval=40,
        eval_tokens=64,
        sample_tokens=8,
        progress=False,
        save_minutes=None,
        log=lambda m: None,
        model_overrides={"n_positions": 128, "n_layer": 2, "n_embd": 64},
    )
    return root / "run"


@pytest.fixture(scope="module")
def reference(run):
    """gptforge's model, tokenizer, the probe's ids and its greedy continuation."""
    from gptforge.checkpoint import load_model_and_tokenizer
    from gptforge.generate import generate_ids

    model, tok = load_model_and_tokenizer(run, device="cpu")
    ids = tok.encode(PROBE)
    return model, tok, ids, generate_ids(model, ids, max_new_tokens=STEPS, do_sample=False, eos_id=None)[0]


def _gguf_tensors(path: Path) -> dict:
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(path)
    return reader, {t.name: t for t in reader.tensors}


def _field(reader, key):
    return reader.fields[key].contents()


@pytest.mark.parametrize("type", ["f32", "f16", "q8_0"])
def test_gguf_reads_back_with_llama_cpps_names_shapes_and_values(run, reference, tmp_path, type):
    gguf = pytest.importorskip("gguf")
    from gptforge.export_gguf import gguf_name

    model, tok, _, _ = reference
    out = export_model(run, tmp_path / "gguf", format="gguf", type=type)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "loss.png", "model.gguf"] or sorted(
        p.name for p in out.iterdir()
    ) == ["README.md", "model.gguf"]
    reader, tensors = _gguf_tensors(out / "model.gguf")
    c = model.config
    assert _field(reader, "general.architecture") == "gpt2"
    assert _field(reader, "gpt2.context_length") == c.n_positions and _field(reader, "gpt2.block_count") == c.n_layer
    assert _field(reader, "gpt2.embedding_length") == c.n_embd
    assert _field(reader, "gpt2.attention.head_count") == c.n_head
    assert _field(reader, "gpt2.feed_forward_length") == c.mlp_width
    assert _field(reader, "tokenizer.ggml.model") == "gpt2" and _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == c.vocab_size and [tok.hf_tokenizer.token_to_id(t) for t in tokens[: tok.vocab_size]] == list(
        range(tok.vocab_size)
    )
    types = _field(reader, "tokenizer.ggml.token_type")
    assert types[tok.eos_id] == gguf.TokenType.CONTROL and types.count(gguf.TokenType.NORMAL) == tok.vocab_size - 1
    merges = json.loads(tok.hf_tokenizer.to_str())["model"]["merges"]
    assert _field(reader, "tokenizer.ggml.merges") == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tok.eos_id
    weights = {gguf_name(k): v.numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert set(tensors) == set(weights)  # the head is tied: llama.cpp reads token_embd for it
    for name, want in weights.items():
        t = tensors[name]
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        assert tuple(reversed(t.shape.tolist())) == want.shape, name  # GGUF lists dimensions innermost first
        matrix = want.ndim == 2 and not name.startswith("position_embd")
        kind = gguf.GGMLQuantizationType[type.upper()] if matrix else gguf.GGMLQuantizationType.F32
        assert t.tensor_type == kind, name
        if kind == gguf.GGMLQuantizationType.F32:
            assert (got == want).all(), name
        else:  # f16 rounding, or q8_0: one scale per block of 32, 127 steps each side
            step = abs(want).max() / (127 if type == "q8_0" else 1024)
            assert abs(got - want).max() <= step, name
    card = (out / "README.md").read_text()
    assert "library_name: gguf" in card and "llama-cli -m model.gguf" in card and f"--type {type}" in card


def test_gguf_refuses_what_llama_cpp_cannot_reproduce(run, tmp_path):
    pytest.importorskip("gguf")
    import shutil

    from gptforge.data.vocabulary import train_tokenizer

    char = tmp_path / "char"
    shutil.copytree(run, char, ignore=shutil.ignore_patterns("data", "checkpoints", "best"))
    train_tokenizer([], kind="char", vocab_size=40, min_frequency=1, texts=["the cake needs flour"], out_dir=char)
    with pytest.raises(TokenizerError, match=r"tokenizer.json: llama.cpp cannot reproduce this tokenizer: a character"):
        export_model(char, tmp_path / "a", format="gguf")
    split = tmp_path / "split"
    shutil.copytree(run, split, ignore=shutil.ignore_patterns("data", "checkpoints", "best"))
    spec = json.loads((split / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    (split / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(TokenizerError, match="its pre-tokenizer \\(Whitespace\\) is not GPT-2's byte-level split"):
        export_model(split, tmp_path / "b", format="gguf")
    relu = tmp_path / "relu"
    shutil.copytree(run, relu, ignore=shutil.ignore_patterns("data", "checkpoints", "best"))
    config = json.loads((relu / "config.json").read_text())
    (relu / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    with pytest.raises(ConfigError, match="activation_function 'relu'; llama.cpp's gpt2"):
        export_model(relu, tmp_path / "c", format="gguf")
    assert not any((tmp_path / name).exists() for name in "abc")


def test_export_refuses_a_type_the_format_has_not(run, tmp_path):
    with pytest.raises(OptionError, match="--type q8_0: --format onnx takes f32, int8"):
        export_model(run, tmp_path / "x", format="onnx", type="q8_0")
    assert main(["export", str(run), str(tmp_path / "y"), "--format", "ct2", "--type", "f16"]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_a_classifier_is_exported_as_the_transformers_folder_only(run, tmp_path):
    import shutil

    clf = tmp_path / "clf"
    shutil.copytree(run, clf, ignore=shutil.ignore_patterns("data", "checkpoints", "best"))
    config = json.loads((clf / "config.json").read_text())
    config.update(architectures=["GPT2ForSequenceClassification"], id2label={"0": "sport", "1": "food"})
    (clf / "config.json").write_text(json.dumps(config))
    for format in ("gguf", "onnx", "ct2"):
        with pytest.raises(OptionError, match=f"a text classifier; --format {format} exports language models"):
            export_model(clf, tmp_path / format, format=format)
    assert not any((tmp_path / format).exists() for format in ("gguf", "onnx", "ct2"))


def test_export_command_offers_every_format_and_type():
    parser = build_parser()
    for format, types in FORMATS.items():
        for type in types:
            args = parser.parse_args(["export", "run", "out", "--format", format, "--type", type])
            assert (args.format, args.type) == (format, type)
    assert parser.parse_args(["export", "run", "out"]).format == "transformers"


def test_a_missing_extra_is_named(run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf fails
    with pytest.raises(OptionError, match=r"^--format gguf needs the gguf package .*pip install 'gptforge\[gguf\]'"):
        export_model(run, tmp_path / "x", format="gguf")
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(OptionError, match=r"^--format onnx needs the onnx package: pip install 'gptforge\[onnx\]'"):
        export_model(run, tmp_path / "y", format="onnx")


@pytest.fixture(scope="module")
def onnx_export(run, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    return export_model(run, tmp_path_factory.mktemp("onnx") / "out", format="onnx", type="int8")


def test_onnx_decodes_greedily_as_gptforge(onnx_export, reference):
    from gptforge.export_onnx import greedy

    model, tok, ids, want = reference
    assert len(set(want)) > 3  # a model that repeats one token would check little
    assert greedy(onnx_export / "model.onnx", ids, STEPS) == want
    names = {p.name for p in onnx_export.iterdir()}
    assert {"model.onnx", "model_int8.onnx", "tokenizer.json", "config.json", "README.md"} <= names
    assert "model.safetensors" not in names
    card = (onnx_export / "README.md").read_text()
    assert "library_name: onnx" in card and 'ort.InferenceSession("model_int8.onnx")' in card


def test_onnx_graph_has_the_cache_inputs_and_outputs(onnx_export, reference):
    import onnxruntime as ort

    c = reference[0].config
    session = ort.InferenceSession(str(onnx_export / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    assert inputs[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert inputs[3:] == [f"past_key_values.{i}.{k}" for i in range(c.n_layer) for k in ("key", "value")]
    assert [o.name for o in session.get_outputs()] == ["logits"] + [
        f"present.{i}.{k}" for i in range(c.n_layer) for k in ("key", "value")
    ]


def test_onnx_int8_runs_and_mostly_agrees(onnx_export, reference):
    from gptforge.export_onnx import greedy

    _, _, ids, want = reference
    got = greedy(onnx_export / "model_int8.onnx", ids, STEPS)
    assert len(got) == STEPS and got[0] == want[0]  # int8 products round: the first token, not all 20


def test_onnx_batch_with_left_padding_matches_gptforge(onnx_export, reference):
    import numpy as np
    import onnxruntime as ort
    import torch

    model, tok, ids, _ = reference
    short = tok.encode("flour and sugar")
    n = len(ids)
    batch = [ids, [tok.eos_id] * (n - len(short)) + short]
    mask = [[1] * n, [0] * (n - len(short)) + [1] * len(short)]
    positions = [list(range(n)), [0] * (n - len(short)) + list(range(len(short)))]
    session = ort.InferenceSession(str(onnx_export / "model.onnx"), providers=["CPUExecutionProvider"])
    past = {
        i.name: np.zeros((2, model.config.n_head, 0, model.config.head_dim), np.float32)
        for i in session.get_inputs()
        if i.name.startswith("past")
    }
    logits = session.run(
        ["logits"],
        {"input_ids": np.array(batch), "attention_mask": np.array(mask), "position_ids": np.array(positions), **past},
    )[0]
    with torch.no_grad():
        want, _ = model(torch.tensor(batch), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions))
    assert np.allclose(logits[:, -1], want[:, -1].numpy(), atol=1e-4)


def test_ct2_decodes_greedily_as_gptforge(run, reference, tmp_path):
    ctranslate2 = pytest.importorskip("ctranslate2")
    pytest.importorskip("transformers")
    model, tok, ids, want = reference
    out = export_model(run, tmp_path / "ct2", format="ct2")
    assert {"model.bin", "vocabulary.json", "tokenizer.json", "README.md"} <= {p.name for p in out.iterdir()}
    generator = ctranslate2.Generator(str(out))
    tokens = [tok.hf_tokenizer.id_to_token(i) for i in ids]
    result = generator.generate_batch(
        [tokens], max_length=STEPS, sampling_topk=1, include_prompt_in_result=False, end_token=[]
    )
    assert result[0].sequences_ids[0] == want
    assert "ctranslate2.Generator" in (out / "README.md").read_text()


# --- llama.cpp itself ------------------------------------------------------------------------------------------

LLAMA_CPP = Path(os.environ.get("GPTFORGE_LLAMA_CPP", Path.home() / ".cache" / "gptforge" / "llama-cpp-python"))


def _llama_cpp():
    """llama-cpp-python, installed or built once into LLAMA_CPP (benchmarks/build_llama_cpp.sh); None otherwise."""
    try:
        import llama_cpp

        return llama_cpp
    except ImportError:
        pass
    if not (LLAMA_CPP / "llama_cpp").is_dir():
        return None
    sys.path.insert(0, str(LLAMA_CPP))
    try:
        import llama_cpp

        return llama_cpp
    except (ImportError, OSError):
        return None
    finally:
        sys.path.remove(str(LLAMA_CPP))


@pytest.mark.slow
@pytest.mark.parametrize("type", ["f32", "f16", "q8_0"])
def test_llama_cpp_tokenizes_and_decodes_as_gptforge(run, reference, tmp_path, type, monkeypatch):
    llama_cpp = _llama_cpp()
    if llama_cpp is None:
        pytest.skip(
            f"llama-cpp-python is not built: run benchmarks/build_llama_cpp.sh (minutes) to build it into {LLAMA_CPP}"
        )
    model, tok, ids, want = reference
    out = export_model(run, tmp_path / "gguf", format="gguf", type=type)
    if type == "q8_0":  # llama.cpp's AMX q8_0 kernels crash on the AMX machine this was written on, on llama.cpp's
        # own q8_0 files too (their tensors are byte for byte ours): its plain CPU kernels check the file
        default = llama_cpp.llama_cpp.llama_model_default_params

        def plain():
            params = default()
            params.use_extra_bufts = False
            return params

        monkeypatch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", plain)
    llm = llama_cpp.Llama(str(out / "model.gguf"), n_ctx=model.config.n_positions, verbose=False, seed=0)
    assert llm.tokenize(PROBE.encode(), add_bos=False, special=False) == ids
    got = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        got.append(token)
        if len(got) == STEPS:
            break
    assert got == want


def test_gguf_q8_0_keeps_rows_that_do_not_split_into_blocks_in_f16():
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from gptforge.export_gguf import _tensor_type

    rows = np.random.default_rng(0).standard_normal((4, 48)).astype(np.float32)  # 48 is not a multiple of 32
    data, kind = _tensor_type(gguf, "blk.0.attn_qkv.weight", rows, "q8_0")
    assert kind == gguf.GGMLQuantizationType.F16 and (data == rows.astype(np.float16)).all()
    data, kind = _tensor_type(gguf, "blk.0.attn_qkv.weight", rows[:, :32], "q8_0")
    assert kind == gguf.GGMLQuantizationType.Q8_0
    assert np.abs(gguf.quants.dequantize(data, kind).reshape(4, 32) - rows[:, :32]).max() < 0.05
