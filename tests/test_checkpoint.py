"""Model folders: parity with transformers in both directions, every folder variant it writes, and errors."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import LazyTransformers
from safetensors import safe_open
from safetensors.torch import save_file

from gptforge import GPT, CheckpointError, ConfigError, GPTConfig, checkpoint, load_model, save_model
from gptforge.checkpoint import from_hf_state_dict, read_state_dict

transformers = LazyTransformers()  # tests that use it skip one by one without it

# Three shapes: even heads; an odd number of heads; n_inner set (with a different activation).
SHAPES = {
    "even": dict(vocab_size=300, n_positions=64, n_embd=64, n_layer=2, n_head=4),
    "odd_heads": dict(vocab_size=257, n_positions=48, n_embd=48, n_layer=3, n_head=3),
    "n_inner": dict(
        vocab_size=311, n_positions=40, n_embd=32, n_layer=2, n_head=2, n_inner=80, activation_function="gelu"
    ),
}


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Random values in every parameter (biases and LayerNorms too) so that a mix-up cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1
            p.copy_(1.0 + noise if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else noise)


def _hf_model(shape: dict, seed: int = 0):
    config = transformers.GPT2Config(**shape, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    _perturb(model, seed)
    return model


def _ids(vocab: int, batch: int = 2, length: int = 17) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(5))


def _assert_same_logits(ours: GPT, hf, vocab: int) -> None:
    ids = _ids(vocab)
    with torch.no_grad():
        a = ours(ids)[0]
        b = hf(ids).logits
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= 1e-4


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_transformers_folder_loads_with_same_logits(tmp_path, shape):
    hf = _hf_model(shape)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert not ours.training
    assert ours.config.n_head == shape["n_head"] and ours.config.mlp_width == shape.get("n_inner", 4 * shape["n_embd"])
    _assert_same_logits(ours, hf, shape["vocab_size"])


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_gptforge_folder_loads_in_transformers_with_same_logits(tmp_path, shape):
    ours = GPT(GPTConfig(**shape, bos_token_id=0, eos_token_id=0)).eval()
    _perturb(ours, seed=1)
    save_model(ours, tmp_path)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert type(hf).__name__ == "GPT2LMHeadModel"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    _assert_same_logits(ours, hf.eval(), shape["vocab_size"])


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_legacy_pytorch_model_bin_with_old_buffers(tmp_path, shape):
    """What transformers 2.x-4.x wrote: pytorch_model.bin, lm_head.weight included, causal-mask buffers."""
    hf = _hf_model(shape)
    hf.config.save_pretrained(tmp_path)
    sd = dict(hf.state_dict())
    assert "lm_head.weight" in sd
    n = shape["n_positions"]
    for i in range(shape["n_layer"]):
        sd[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.uint8)).view(1, 1, n, n)
        sd[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    _assert_same_logits(load_model(tmp_path), hf, shape["vocab_size"])


def test_gpt2model_state_dict_without_prefix(tmp_path):
    """A GPT2Model (no LM head) saves keys like `h.0.attn.c_attn.weight`: the head is the tied wte."""
    shape = SHAPES["odd_heads"]
    hf = _hf_model(shape)
    hf.config.save_pretrained(tmp_path)
    body = {k: v.contiguous() for k, v in hf.transformer.state_dict().items()}
    assert not any(k.startswith("transformer.") for k in body)
    save_file(body, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    _assert_same_logits(load_model(tmp_path), hf, shape["vocab_size"])


def test_explicit_lm_head_weight_is_accepted_and_tied(tmp_path):
    shape = SHAPES["even"]
    hf = _hf_model(shape)
    hf.config.save_pretrained(tmp_path)
    sd = {k: v.clone() for k, v in hf.state_dict().items()}  # clone: lm_head.weight as its own tensor
    save_file(sd, str(tmp_path / "model.safetensors"))
    ours = load_model(tmp_path)
    assert ours.lm_head.weight is ours.transformer.wte.weight
    _assert_same_logits(ours, hf, shape["vocab_size"])


def test_untied_lm_head_is_refused(tmp_path):
    """gptforge ties the head; silently replacing a different head by wte would change the model."""
    shape = SHAPES["even"]
    hf = _hf_model(shape)
    hf.config.save_pretrained(tmp_path)
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    sd["lm_head.weight"] += 1.0
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        load_model(tmp_path)


def test_sharded_safetensors_with_index(tmp_path):
    shape = SHAPES["n_inner"]
    hf = _hf_model(shape)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert not (tmp_path / "model.safetensors").exists()
    _assert_same_logits(load_model(tmp_path), hf, shape["vocab_size"])


@pytest.mark.parametrize("config_as", ["folder", "file", "object"])
def test_single_weights_file_with_separate_config(tmp_path, config_as):
    shape = SHAPES["even"]
    hf = _hf_model(shape)
    hf.save_pretrained(tmp_path / "hf")
    weights_dir = tmp_path / "weights"
    weights_dir.mkdir()
    (tmp_path / "hf" / "model.safetensors").rename(weights_dir / "w.safetensors")
    config = {
        "folder": tmp_path / "hf",
        "file": tmp_path / "hf" / "config.json",
        "object": GPTConfig.load(tmp_path / "hf"),
    }[config_as]
    _assert_same_logits(load_model(weights_dir / "w.safetensors", config=config), hf, shape["vocab_size"])


def test_single_weights_file_uses_its_folders_config(tmp_path):
    shape = SHAPES["odd_heads"]
    hf = _hf_model(shape)
    hf.save_pretrained(tmp_path)
    _assert_same_logits(load_model(tmp_path / "model.safetensors"), hf, shape["vocab_size"])


def test_load_model_dtype(tmp_path):
    ours = GPT(GPTConfig(**SHAPES["even"]))
    save_model(ours, tmp_path)
    half = load_model(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    assert half.lm_head.weight is half.transformer.wte.weight


# --- the saved folder -----------------------------------------------------------------------------


def test_saved_folder_layout(tmp_path):
    config = GPTConfig(**SHAPES["n_inner"], bos_token_id=3, eos_token_id=4)
    ours = GPT(config)
    save_model(ours, tmp_path)
    assert {"config.json", "model.safetensors", "generation_config.json"} <= {p.name for p in tmp_path.iterdir()}
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind

    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["architectures"] == ["GPT2LMHeadModel"]
    assert cfg["n_inner"] == 80 and cfg["n_head"] == 2 and cfg["activation_function"] == "gelu"
    assert "gradient_checkpointing" not in cfg and "extra" not in cfg

    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert gen["bos_token_id"] == 3 and gen["eos_token_id"] == 4

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
        assert "lm_head.weight" not in keys
        assert keys == {k for k in ours.state_dict() if k != "lm_head.weight"}
        d, h = config.n_embd, config.mlp_width
        # Conv1D layout: (in, out), the transpose of nn.Linear.
        assert tuple(f.get_slice("transformer.h.0.attn.c_attn.weight").get_shape()) == (d, 3 * d)
        assert tuple(f.get_slice("transformer.h.0.mlp.c_fc.weight").get_shape()) == (d, h)
        assert tuple(f.get_slice("transformer.h.0.mlp.c_proj.weight").get_shape()) == (h, d)
        assert torch.equal(f.get_tensor("transformer.h.1.mlp.c_fc.weight"), ours.transformer.h[1].mlp.c_fc.weight.t())
        assert torch.equal(
            f.get_tensor("transformer.h.0.attn.c_proj.weight"), ours.transformer.h[0].attn.c_proj.weight.t()
        )


def test_save_load_round_trip_is_exact(tmp_path):
    ours = GPT(GPTConfig(**SHAPES["odd_heads"]))
    _perturb(ours, seed=3)
    save_model(ours, tmp_path)
    back = load_model(tmp_path)
    a, b = ours.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert back.lm_head.weight.data_ptr() == back.transformer.wte.weight.data_ptr()


def test_unknown_config_keys_survive_a_round_trip(tmp_path, hf_gpt2_dir):
    cfg = json.loads((hf_gpt2_dir / "config.json").read_text())
    cfg["my_note"] = "kept"
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "config.json").write_text(json.dumps(cfg))
    model = load_model(hf_gpt2_dir / "model.safetensors", config=tmp_path / "in")
    save_model(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["my_note"] == "kept"


# --- errors ---------------------------------------------------------------------------------------


def test_missing_config_names_the_folder(tmp_path, hf_gpt2_dir):
    folder = tmp_path / "noconfig"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((hf_gpt2_dir / "model.safetensors").read_bytes())
    with pytest.raises(FileNotFoundError, match="noconfig.*config.json"):
        load_model(folder)


def test_missing_weights_names_the_folder(tmp_path, hf_gpt2_dir):
    folder = tmp_path / "noweights"
    folder.mkdir()
    (folder / "config.json").write_text((hf_gpt2_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match="noweights.*no weights"):
        load_model(folder)


def test_missing_path_is_an_error_not_a_download(tmp_path, monkeypatch):
    def no_download(repo_id):
        raise AssertionError(f"tried to download {repo_id}")

    monkeypatch.setattr(checkpoint, "fetch_from_hub", no_download)
    with pytest.raises(CheckpointError, match="no such model folder"):
        load_model(tmp_path / "nothing")
    # A relative `runs/model` (looks like a hub id) whose folder `runs` exists is a mistyped local path.
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="runs/model.*no such model folder"):
        load_model("runs/model")


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path, hf_gpt2_dir):
    cfg = json.loads((hf_gpt2_dir / "config.json").read_text())
    cfg["vocab_size"] = 320
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        load_model(hf_gpt2_dir / "model.safetensors", config=tmp_path)
    msg = str(e.value)
    assert "transformer.wte.weight" in msg and "(300, 64)" in msg and "(320, 64)" in msg
    assert "\n" not in msg


def test_shape_mismatch_in_a_block(tmp_path):
    small = GPT(GPTConfig(**{**SHAPES["even"], "n_inner": 96}))
    save_model(small, tmp_path)
    sd = read_state_dict(tmp_path)
    with pytest.raises(CheckpointError, match=r"c_fc.bias.*\(96,\).*\(256,\)"):
        load_model(tmp_path / "model.safetensors", config=GPTConfig(**SHAPES["even"]))
    # Shapes are named as stored in the file (Conv1D: (in, out)).
    del sd["transformer.h.0.mlp.c_fc.bias"]
    with pytest.raises(CheckpointError, match=r"c_fc.weight.*\(64, 96\).*\(64, 256\)"):
        from_hf_state_dict(sd, GPTConfig(**SHAPES["even"]))


def test_missing_tensor_is_named(tmp_path, hf_gpt2_dir):
    sd = read_state_dict(hf_gpt2_dir)
    del sd["transformer.h.1.ln_2.bias"]
    with pytest.raises(CheckpointError, match="h.1.ln_2.bias"):
        from_hf_state_dict(sd, GPTConfig.load(hf_gpt2_dir))


def test_foreign_tensor_is_named(tmp_path, hf_gpt2_dir):
    sd = read_state_dict(hf_gpt2_dir)
    sd["score.weight"] = torch.zeros(2, 64)
    with pytest.raises(CheckpointError, match="score.weight"):
        from_hf_state_dict(sd, GPTConfig.load(hf_gpt2_dir))


@pytest.mark.parametrize(
    "name,content",
    [
        ("model.safetensors", b"this is not a weights file at all"),
        ("model.safetensors", b""),
        ("pytorch_model.bin", b"PK\x03\x04 truncated zip"),
        ("pytorch_model.bin", b"plain text"),
    ],
)
def test_corrupt_weights_file(tmp_path, hf_gpt2_dir, name, content):
    (tmp_path / "config.json").write_text((hf_gpt2_dir / "config.json").read_text())
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CheckpointError, match=name) as e:
        load_model(tmp_path)
    assert "\n" not in str(e.value)


def test_truncated_safetensors(tmp_path, hf_gpt2_dir):
    (tmp_path / "config.json").write_text((hf_gpt2_dir / "config.json").read_text())
    data = (hf_gpt2_dir / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(tmp_path)


def test_pickle_with_code_is_refused(tmp_path, hf_gpt2_dir):
    """pytorch_model.bin is read with weights_only=True: a pickle that runs code is not executed."""
    (tmp_path / "config.json").write_text((hf_gpt2_dir / "config.json").read_text())
    torch.save({"x": _Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        load_model(tmp_path)
    assert not (tmp_path / "pwned").exists()


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_unreadable_weights_file(tmp_path, hf_gpt2_dir, monkeypatch):
    (tmp_path / "config.json").write_text((hf_gpt2_dir / "config.json").read_text())
    weights = tmp_path / "model.safetensors"
    weights.write_bytes((hf_gpt2_dir / "model.safetensors").read_bytes())
    weights.chmod(0)
    if os.geteuid() == 0:  # root reads any file: make the read fail the way a permission error does

        def denied(path, *args, **kwargs):
            raise PermissionError(13, "Permission denied", str(path))

        monkeypatch.setattr(checkpoint, "load_file", denied)
    with pytest.raises(CheckpointError, match="model.safetensors.*cannot read.*Permission denied"):
        load_model(tmp_path)


def test_broken_config_json(tmp_path, hf_gpt2_dir):
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(ConfigError, match="config.json"):
        load_model(tmp_path)


def test_config_of_another_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="llama"):
        load_model(tmp_path)


def test_offline_hub_id_fails_fast_and_says_how_to_use_a_folder(tmp_path, monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads its environment once, at import: set what it already read, too.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # so that no local folder named like the id exists
    for name in ("gpt2", "openai-community/gpt2-medium"):
        with pytest.raises(CheckpointError) as e:
            load_model(name)
        msg = str(e.value)
        assert name in msg and "local folder" in msg and "\n" not in msg
