"""GPTConfig: validation, presets, build_gpt2_config, and transformers' config.json format."""

from __future__ import annotations

import json

import pytest

from gptforge import PRESETS, ConfigError, GPTConfig, build_gpt2_config, preset


@pytest.mark.parametrize(
    "kwargs,words",
    [
        (dict(n_embd=100, n_head=3), ["n_embd=100", "n_head=3", "divisible"]),
        (dict(n_embd=768, n_head=7), ["n_embd=768", "n_head=7"]),
        (dict(n_layer=0), ["n_layer", "0"]),
        (dict(vocab_size=-5), ["vocab_size", "-5"]),
        (dict(n_positions=0), ["n_positions", "0"]),
        (dict(n_head=0), ["n_head", "0"]),
        (dict(n_embd=-8), ["n_embd", "-8"]),
        (dict(n_inner=0), ["n_inner", "0"]),
        (dict(n_layer=2.5), ["n_layer", "2.5"]),
        (dict(n_head=True), ["n_head", "True"]),
        (dict(resid_pdrop=1.5), ["resid_pdrop", "1.5"]),
        (dict(attn_pdrop=-0.1), ["attn_pdrop", "-0.1"]),
        (dict(activation_function="swish"), ["swish", "gelu_new"]),
    ],
)
def test_invalid_configs_name_the_values(kwargs, words):
    with pytest.raises(ConfigError) as e:
        GPTConfig(**kwargs)
    msg = str(e.value)
    assert isinstance(e.value, ValueError)  # so the CLI prints it as a one-line error
    assert "\n" not in msg
    for word in words:
        assert word in msg


def test_divisibility_error_suggests_a_valid_width():
    with pytest.raises(ConfigError) as e:
        GPTConfig(n_embd=100, n_head=3)
    suggested = int(str(e.value).split("e.g. n_embd=")[1].rstrip(")"))
    assert suggested % 3 == 0 and GPTConfig(n_embd=suggested, n_head=3).head_dim == suggested // 3


def test_defaults_are_gpt2_small():
    c = GPTConfig()
    assert (c.vocab_size, c.n_positions, c.n_embd, c.n_layer, c.n_head) == (50257, 1024, 768, 12, 12)
    assert c.mlp_width == 3072 and c.head_dim == 64 and c.activation_function == "gelu_new"
    assert c.num_params() == 124_439_808


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_are_valid(name):
    c = preset(name)
    assert c.n_embd % c.n_head == 0
    assert c.num_params() > 0


def test_preset_accepts_hub_style_names_and_overrides():
    c = preset("openai-community/gpt2-medium", n_positions=256)
    assert (c.n_embd, c.n_layer, c.n_head, c.n_positions) == (1024, 24, 16, 256)
    assert preset("gpt2-xl").n_head == 25
    with pytest.raises(ConfigError, match="'gpt5'.*gpt2-medium"):
        preset("gpt5")
    with pytest.raises(ConfigError, match="n_head=5"):
        preset("gpt2", n_head=5)


def test_small_presets_fit_a_laptop():
    for name in ("tiny", "mini", "small"):
        c = preset(name)
        assert c.num_params() < 30_000_000
        assert c.resid_pdrop == c.embd_pdrop == c.attn_pdrop == 0.0  # measured better from scratch
        assert preset(name, resid_pdrop=0.1).resid_pdrop == 0.1
    assert preset("gpt2").resid_pdrop == 0.1  # GPT-2's own value


def test_build_gpt2_config_like_older_tools():
    c = build_gpt2_config(vocab_size=1000, max_length=64, dropout=0.2, n_embd=128, n_layer=3, n_head=4)
    assert (c.vocab_size, c.n_positions, c.n_embd, c.n_layer, c.n_head) == (1000, 64, 128, 3, 4)
    assert c.resid_pdrop == c.embd_pdrop == c.attn_pdrop == 0.2
    d = build_gpt2_config()
    assert (d.vocab_size, d.n_positions, d.n_embd, d.n_layer, d.n_head) == (5000, 32, 256, 8, 8)
    assert build_gpt2_config(bos_token_id=1, eos_token_id=2, n_inner=64).eos_token_id == 2
    with pytest.raises(ConfigError, match="n_embd=100.*n_head=8"):
        build_gpt2_config(n_embd=100)


def test_config_json_round_trip(tmp_path):
    c = GPTConfig(
        vocab_size=321,
        n_positions=40,
        n_embd=24,
        n_layer=3,
        n_head=3,
        n_inner=50,
        resid_pdrop=0.05,
        bos_token_id=1,
        eos_token_id=2,
        extra={"custom": [1, 2]},
    )
    c.save(tmp_path / "config.json")
    d = json.loads((tmp_path / "config.json").read_text())
    assert d["model_type"] == "gpt2" and d["architectures"] == ["GPT2LMHeadModel"]
    assert d["n_ctx"] == 40 and d["custom"] == [1, 2]
    back = GPTConfig.load(tmp_path)  # a folder is accepted too
    assert back == c


def test_reads_a_transformers_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.GPT2Config(
        vocab_size=99, n_embd=30, n_head=5, n_layer=1, n_inner=7, activation_function="relu"
    ).save_pretrained(tmp_path)
    c = GPTConfig.load(tmp_path / "config.json")
    assert (c.vocab_size, c.n_embd, c.n_head, c.n_layer, c.n_inner, c.activation_function) == (99, 30, 5, 1, 7, "relu")
    # Our config.json is read back by transformers with the same values.
    c.save(tmp_path / "ours.json")
    hf = transformers.GPT2Config.from_json_file(tmp_path / "ours.json")
    assert (hf.vocab_size, hf.n_embd, hf.n_head, hf.n_inner, hf.activation_function) == (99, 30, 5, 7, "relu")


def test_config_json_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPTConfig.load(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2")
    with pytest.raises(ConfigError, match="config.json.*JSON"):
        GPTConfig.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 10, "n_head": 4}))
    with pytest.raises(ConfigError, match="n_embd=10"):
        GPTConfig.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConfigError, match="bert"):
        GPTConfig.load(tmp_path)


def test_flops_per_token_counts_every_matrix_product():
    # gpt2: 85,056,000 non-embedding weights, the 50,257 x 768 head, attention over 1,024 positions
    assert preset("gpt2").flops_per_token(1024) == 6 * (85_056_000 + 50_257 * 768) + 12 * 12 * 768 * 1024
    tiny = preset("tiny")
    assert tiny.flops_per_token() == tiny.flops_per_token(tiny.n_positions) < tiny.flops_per_token(4 * tiny.n_positions)
