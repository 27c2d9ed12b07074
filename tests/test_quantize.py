"""int8 weights: logits near fp32, the stored folder round trip, on-load and stored quantization agree, and
bad input (an already-int8 folder, an unknown --quantize, transformers opening an int8 folder) is refused
clearly. fp32 exactness against transformers is tested in test_generate.py."""

from __future__ import annotations

import json

import pytest
import torch

from gptforge import kernels
from gptforge.checkpoint import load_model, quantize_folder, save_model
from gptforge.config import GPTConfig
from gptforge.errors import GPTForgeError, OptionError, RunFolderError
from gptforge.generate import generate, generate_ids
from gptforge.inference import int8
from gptforge.inference.int8 import is_int8
from gptforge.inference.quantize import (
    QUANT_METHOD,
    WEIGHTS_NAME,
    check_method,
    quantize_model,
)
from gptforge.model import GPT

# Tolerance of int8 logits: per-channel int8 weights (and, on fbgemm, 8-bit inputs) of a random 2-layer model
# move each logit by at most this share of the largest fp32 logit.
LOGIT_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def fp32_dir(tmp_path_factory, sample_text):
    """A small random fp32 model folder with a character tokenizer."""
    from gptforge.data.vocabulary import train_tokenizer

    tok = train_tokenizer([], kind="char", vocab_size=100, texts=[sample_text], out_dir=None)
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=tok.vocab_size,
        n_positions=64,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=tok.eos_id,
        eos_token_id=tok.eos_id,
    )
    folder = tmp_path_factory.mktemp("fp32")
    save_model(GPT(config), folder, tok)
    return folder


@pytest.fixture(scope="module")
def int8_dir(fp32_dir, tmp_path_factory):
    return quantize_folder(fp32_dir, tmp_path_factory.mktemp("q") / "int8")


def _relative_error(model: GPT, other: GPT, ids: torch.Tensor) -> float:
    with torch.inference_mode():
        a, b = model(ids)[0], other(ids)[0]
    return ((a - b).abs().max() / a.abs().max()).item()


@pytest.mark.parametrize("kernels_on", ["1", "0"])
def test_int8_logits_are_close_to_fp32(fp32_dir, monkeypatch, kernels_on):
    monkeypatch.setenv(kernels.SWITCH, kernels_on)  # fbgemm's int8 product, then the plain one
    model = load_model(fp32_dir)
    q = quantize_model(model, inplace=False)
    assert is_int8(q) and not is_int8(model)  # the original is untouched
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    err = _relative_error(model, q, ids)
    assert 0 < err < LOGIT_TOLERANCE


def test_fbgemm_and_plain_int8_products_agree(monkeypatch):
    if int8._fbgemm_reduce_range() is None:
        pytest.skip("this torch build has no working fbgemm int8 product")
    torch.manual_seed(0)
    layer = int8.Int8Linear.from_linear(torch.nn.Linear(96, 40))
    x = torch.randn(3, 5, 96)
    with torch.inference_mode():
        fast = layer(x)
        monkeypatch.setenv(kernels.SWITCH, "0")
        plain = layer(x)
    assert fast.shape == plain.shape == (3, 5, 40)
    assert (fast - plain).abs().max() < 0.02 * plain.abs().max()


def test_quantize_rows_reconstructs_each_row_within_half_a_step():
    w = torch.randn(17, 33) * torch.logspace(-3, 1, 17)[:, None]  # rows of very different sizes
    q, scale = int8.quantize_rows(w)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all()


def test_int8_folder_round_trip(int8_dir, fp32_dir):
    files = {p.name for p in int8_dir.iterdir()}
    assert WEIGHTS_NAME in files and "model.safetensors" not in files and "tokenizer.json" in files
    config = json.loads((int8_dir / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == QUANT_METHOD and config["model_type"] == "gpt2"
    loaded = load_model(int8_dir)
    fresh = load_model(fp32_dir, quantize="int8")
    assert is_int8(loaded)
    a, b = loaded.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["lm_head.weight"].dtype == torch.int8 and a["transformer.wte.weight"].dtype == torch.float32
    # saving an int8 model again (GPTForge.save, save_model) writes an int8 folder, not an fp32 one
    again = save_model(loaded, int8_dir.parent / "again")
    assert (again / WEIGHTS_NAME).is_file() and not (again / "model.safetensors").exists()
    assert torch.equal(load_model(again).state_dict()["lm_head.weight"], a["lm_head.weight"])


def test_stored_int8_generates_what_on_load_quantization_generates(int8_dir, fp32_dir):
    from gptforge.checkpoint import load_model_and_tokenizer

    stored, tok = load_model_and_tokenizer(int8_dir, device="cpu")
    on_load, _ = load_model_and_tokenizer(fp32_dir, device="cpu", quantize="int8")
    prompts = [tok.encode("the quick"), tok.encode("seven wizards brew")]
    kw = dict(do_sample=False, max_new_tokens=30, eos_id=None)
    ours = generate_ids(stored, prompts, **kw)
    assert ours == generate_ids(on_load, prompts, **kw) and all(len(r) == 30 for r in ours)
    assert generate(stored, tok, "the", do_sample=True, seed=3, max_new_tokens=10) == generate(
        on_load, tok, "the", do_sample=True, seed=3, max_new_tokens=10
    )


def test_api_quantize_and_cli(fp32_dir, int8_dir, capsys):
    from gptforge.api import GPTForge
    from gptforge.cli import main

    ai = GPTForge(fp32_dir, device="cpu", quantize="int8")
    assert is_int8(ai.model)
    want = ai.generate(prompt="the", max_new_tokens=8, temperature=0, return_as_list=True)[0]
    assert main(["generate", str(int8_dir), "the", "--greedy", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == want + "\n"
    assert main(["generate", str(fp32_dir), "the", "--greedy", "--max-new-tokens", "8", "--quantize", "int8"]) == 0
    assert capsys.readouterr().out == want + "\n"
    with pytest.raises(OptionError, match="int8 weights"):
        ai.train(["unused.txt"], num_steps=1)


def test_eval_quantize_scores_near_fp32(fp32_dir, int8_dir, sample_text, tmp_path, capsys):
    from gptforge.cli import main

    text = tmp_path / "val.txt"
    text.write_text(sample_text[:3000], encoding="utf-8")
    losses = []
    for argv in ([str(fp32_dir)], [str(fp32_dir), "--quantize", "int8"], [str(int8_dir)]):
        assert main(["eval", argv[0], str(text), "--json", *argv[1:]]) == 0
        losses.append(json.loads(capsys.readouterr().out)[str(text)]["loss"])
    assert losses[1] == pytest.approx(losses[2], abs=1e-6)  # on load or stored: the same weights
    assert losses[1] == pytest.approx(losses[0], rel=0.01) and losses[1] != losses[0]


def test_quantizing_an_int8_folder_is_refused(int8_dir, tmp_path, capsys):
    from gptforge.cli import main

    with pytest.raises(OptionError, match="already holds int8 weights"):
        quantize_folder(int8_dir, tmp_path / "twice")
    assert main(["quantize", str(int8_dir), "--out", str(tmp_path / "twice")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(int8_dir) in err
    assert not (tmp_path / "twice").exists()


def test_quantize_out_must_be_new_or_forced(fp32_dir, tmp_path, capsys):
    from gptforge.cli import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["quantize", str(fp32_dir), "--out", str(out)]) == 2
    assert "--out" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    with pytest.raises(RunFolderError, match="is .*, which this command reads and would replace"):
        quantize_folder(fp32_dir, fp32_dir, force=True)
    assert main(["quantize", str(fp32_dir), "--out", str(out), "--force"]) == 0
    assert (out / WEIGHTS_NAME).is_file() and not (out / "keep.txt").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "{model}", "x", "--quantize", "int4"],
        ["eval", "{model}", "{model}/config.json", "--quantize", "fp8"],
        ["quantize", "{model}", "--out", "{tmp}/q", "--method", "int4"],
    ],
)
def test_unknown_quantization_is_a_one_line_error(fp32_dir, tmp_path, capsys, argv):
    from gptforge.cli import main

    assert main([a.format(model=fp32_dir, tmp=tmp_path) for a in argv]) == 2
    captured = capsys.readouterr()
    flag = "--method" if "--method" in argv else "--quantize"
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert flag in captured.err and "int8" in captured.err
    with pytest.raises(OptionError, match="quantize='int4'"):
        check_method("int4", "quantize")


def test_api_refuses_unknown_quantization_before_loading(tmp_path):
    from gptforge.api import GPTForge

    with pytest.raises(GPTForgeError, match="quantize='q4'"):
        GPTForge(tmp_path / "does-not-exist", quantize="q4")


def test_foreign_quantization_config_is_refused(fp32_dir, tmp_path):
    import shutil

    other = tmp_path / "bnb"
    shutil.copytree(fp32_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes_8bit"}
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(GPTForgeError, match="bitsandbytes_8bit"):
        load_model(other)


def test_transformers_refuses_an_int8_folder_clearly(int8_dir):
    transformers = pytest.importorskip("transformers")
    with pytest.raises(OSError, match="model.safetensors"):
        transformers.GPT2LMHeadModel.from_pretrained(int8_dir)
