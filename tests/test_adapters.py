"""LoRA adapters: the same logits as peft both ways, merge, training (adapter-only checkpoints, resume, stop), bad
input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from gptforge.adapters import apply_lora, base_fingerprint, has_lora, load_adapter, merge_lora, save_adapter
from gptforge.checkpoint import load_model, load_model_and_tokenizer, merge_to_folder, save_model
from gptforge.config import GPTConfig
from gptforge.errors import CheckpointError, OptionError, RunFolderError
from gptforge.model import GPT
from gptforge.options import LoRAOptions
from gptforge.train.state import list_checkpoints, load_training_state

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _randomise_b(model: torch.nn.Module, seed: int = 0) -> None:
    """A fresh adapter changes nothing (B = 0); give B values so that the checks can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture(scope="module")
def base(tmp_path_factory, sample_text):
    """A small GPT-2 folder with a byte-level BPE tokenizer (vocab ~300, context 64)."""
    from gptforge.data.vocabulary import train_tokenizer

    folder = tmp_path_factory.mktemp("base")
    (folder.parent / "corpus.txt").write_text(sample_text)
    tok = train_tokenizer([folder.parent / "corpus.txt"], vocab_size=300, out_dir=None)
    torch.manual_seed(3)
    config = GPTConfig(
        vocab_size=tok.vocab_size,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=tok.eos_id,
        eos_token_id=tok.eos_id,
    )
    save_model(GPT(config), folder, tok)
    return folder


@pytest.fixture
def ids():
    return torch.randint(0, 250, (2, 20), generator=torch.Generator().manual_seed(1))


def test_gptforge_adapter_opens_in_peft_with_the_same_logits(base, ids, tmp_path):
    model = load_model(base)
    apply_lora(model, 4, 8.0, 0.1, "c_attn,mlp.c_proj", base=base)
    _randomise_b(model)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["base_model_name_or_path"] == str(base.resolve())
    assert sorted(config["target_modules"]) == ["attn.c_attn", "mlp.c_proj"]  # peft adapts exactly these
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" in keys
    assert not any(".attn.c_proj." in k or "c_fc" in k for k in keys)  # only what was targeted

    reference = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(base), tmp_path).eval()
    model.eval()
    with torch.no_grad():
        ours, theirs = model(ids)[0], reference(ids).logits
    with reference.disable_adapter(), torch.no_grad():
        assert (theirs - reference(ids).logits).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_adapter_trained_with_peft_gives_the_same_logits(base, ids, tmp_path):
    hf = transformers.GPT2LMHeadModel.from_pretrained(base)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=12,
        lora_dropout=0.0,
        target_modules=["c_attn", "c_fc"],
        fan_in_fan_out=True,
        task_type="CAUSAL_LM",
        alpha_pattern={"h.1.mlp.c_fc": 3},
        use_rslora=True,
    )
    model = peft.get_peft_model(hf, config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):  # a few real steps, so that B is no longer zero
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(tmp_path)
    model.eval()
    with torch.no_grad():
        theirs = model(ids).logits

    ours = load_model(base)
    load_adapter(ours, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)[0], theirs, atol=1e-4, rtol=1e-4)
        merge_lora(ours)  # folded into the weights: still the same numbers, and a plain model again
        torch.testing.assert_close(ours(ids)[0], theirs, atol=1e-4, rtol=1e-4)
    assert not has_lora(ours) and all(p.requires_grad for p in ours.parameters())


def test_merge_writes_a_plain_folder_transformers_opens(base, ids, tmp_path):
    model = load_model(base)
    apply_lora(model, 2, 4.0, base=base)
    _randomise_b(model, seed=5)
    save_adapter(model, tmp_path / "adapter")
    out = merge_to_folder(base, tmp_path / "adapter", tmp_path / "merged")
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    merged = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    reference = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(base), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, reference.eval()(ids).logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(RunFolderError, match="--out .*already exists and is not empty"):
        merge_to_folder(base, tmp_path / "adapter", out)  # not over a folder that holds files


def test_adapter_folder_alone_names_its_base(base, ids, tmp_path):
    model = load_model(base)
    apply_lora(model, 2, 4.0, base=base)
    _randomise_b(model)
    save_adapter(model, tmp_path)
    loaded, tokenizer = load_model_and_tokenizer(tmp_path, device="cpu")  # no base given: adapter_config.json names it
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids)[0], model.eval()(ids)[0], atol=1e-5, rtol=1e-5)
    assert tokenizer.vocab_size == model.config.vocab_size


def test_adapter_on_another_base_is_refused(base, tmp_path):
    model = load_model(base)
    apply_lora(model, 2, 4.0, base=base)
    save_adapter(model, tmp_path / "adapter")
    other = load_model(base)
    with torch.no_grad():
        other.transformer.h[0].mlp.c_fc.weight.add_(0.01)  # same shapes, other weights: a different base
    assert base_fingerprint(other) != base_fingerprint(load_model(base))
    with pytest.raises(CheckpointError, match="other base weights"):
        load_adapter(other, tmp_path / "adapter")
    wider = GPT(GPTConfig(vocab_size=model.config.vocab_size, n_positions=64, n_embd=64, n_layer=2, n_head=4))
    with pytest.raises(CheckpointError, match="does not fit"):
        load_adapter(wider, tmp_path / "adapter")
    shallow = GPT(GPTConfig(vocab_size=model.config.vocab_size, n_positions=64, n_embd=32, n_layer=1, n_head=4))
    with pytest.raises(CheckpointError, match="lacks"):
        load_adapter(shallow, tmp_path / "adapter")
    vocab = GPT(GPTConfig(vocab_size=model.config.vocab_size + 7, n_positions=64, n_embd=32, n_layer=2, n_head=4))
    with pytest.raises(CheckpointError, match="vocab_size"):
        load_adapter(vocab, tmp_path / "adapter")


def test_bad_lora_options_and_folders(base, tmp_path):
    model = load_model(base)
    with pytest.raises(OptionError, match="--lora-targets 'q_proj'"):
        apply_lora(model, 4, targets="q_proj")
    with pytest.raises(OptionError, match="--lora-r"):
        apply_lora(model, 0)
    for bad in (
        dict(lora_r=0),
        dict(lora_r=-2),
        dict(lora_r=4, lora_alpha=0),
        dict(lora_r=4, lora_dropout=1.0),
        dict(lora_r=4, lora_targets=" , "),
    ):
        with pytest.raises(OptionError):
            LoRAOptions(**bad)
    with pytest.raises(CheckpointError, match="not an adapter folder"):
        load_adapter(model, base)
    apply_lora(model, 2)
    save_adapter(model, tmp_path / "dora")
    config = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(CheckpointError, match="use_dora"):
        load_adapter(load_model(base), tmp_path / "dora")


def _lm_data(tmp_path, base, sample_text):
    from gptforge.data.shards import prepare
    from gptforge.tokenizer import load_tokenizer

    (tmp_path / "text.txt").write_text(sample_text)
    prepare([tmp_path / "text.txt"], load_tokenizer(base), tmp_path / "data", progress=False)
    return tmp_path / "data"


def test_lora_training_saves_the_adapter_only(base, tmp_path, sample_text, one_thread):
    from gptforge.train.pipeline import run_training

    data = _lm_data(tmp_path, base, sample_text)
    result = run_training(
        data=str(data),
        init=str(base),
        lora=LoRAOptions(lora_r=2, lora_targets="c_attn"),
        batch_size=2,
        block_size=32,
        eval_interval=0,
        save_steps=2,
        plot=False,
        progress=False,
        log=lambda m: None,
        out_dir=str(tmp_path / "run"),
        max_steps=4,
    )
    final = tmp_path / "run"
    assert (
        result.step == 4
        and (final / "adapter_model.safetensors").is_file()
        and not (final / "model.safetensors").exists()
    )
    ckpt = list_checkpoints(final)[-1]
    assert not (ckpt / "model.safetensors").exists()
    state = load_training_state(ckpt)
    assert len(state["optimizer"]["state"]) == 2 * 2  # lora_A and lora_B of c_attn in 2 layers: nothing of the base
    base_weights = load_model(base).state_dict()
    trained, _ = load_model_and_tokenizer(base, adapter=final, device="cpu")
    assert not torch.equal(
        trained.transformer.h[0].attn.c_attn.weight, base_weights["transformer.h.0.attn.c_attn.weight"]
    )
    assert torch.equal(trained.transformer.h[0].mlp.c_fc.weight, base_weights["transformer.h.0.mlp.c_fc.weight"])


def test_stopped_lora_run_resumes_exactly(base, tmp_path, sample_text, one_thread):
    from gptforge.train.pipeline import train

    data = _lm_data(tmp_path, base, sample_text)

    def run(out: str, **kw):
        torch.manual_seed(0)
        model = load_model(base)
        apply_lora(model, 2, dropout=0.1, base=base)
        return train(
            model,
            str(data),
            out_dir=str(tmp_path / out),
            max_steps=4,
            batch_size=2,
            block_size=32,
            eval_interval=0,
            plot=False,
            progress=False,
            finetune=True,
            **kw,
        )

    run("straight")
    stop_at_two = lambda trainer: trainer.request_stop() if trainer.step == 2 else None  # what Ctrl-C does  # noqa: E731
    stopped = run("stopped", on_step=stop_at_two)
    assert stopped.interrupted and stopped.step == 2
    ckpt = list_checkpoints(tmp_path / "stopped")[-1]
    assert (ckpt / "adapter_config.json").is_file() and not (ckpt / "model.safetensors").exists()
    assert run("stopped", resume=True).step == 4
    a, b = (load_file(tmp_path / out / "adapter_model.safetensors") for out in ("straight", "stopped"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_lora_options_are_checked_before_any_work(base, tmp_path):
    from gptforge.train.pipeline import run_training

    with pytest.raises(OptionError, match="--init"):
        run_training(
            [str(tmp_path / "missing.txt")], out_dir=str(tmp_path / "r"), lora=LoRAOptions(lora_r=4), max_steps=1
        )
    with pytest.raises(OptionError, match="--freeze"):
        run_training(
            [str(tmp_path / "missing.txt")],
            init=str(base),
            out_dir=str(tmp_path / "r"),
            freeze="embeddings",
            lora=LoRAOptions(lora_r=4),
            max_steps=1,
        )


def test_cli_generate_eval_merge_with_adapter(base, tmp_path, capsys):
    from gptforge.cli import main

    model = load_model(base)
    apply_lora(model, 2, 4.0, base=base)
    _randomise_b(model)
    save_adapter(model, tmp_path / "adapter")
    assert main(["merge", str(base), str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    texts = []
    for args in (
        [str(base), "--adapter", str(tmp_path / "adapter")],
        [str(tmp_path / "merged")],
        [str(tmp_path / "adapter")],
    ):
        capsys.readouterr()
        assert (
            main(["generate", *args[:1], "Hello", *args[1:], "--seed", "3", "--max-new-tokens", "12", "--no-stream"])
            == 0
        )
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] == texts[2]
    (tmp_path / "t.txt").write_text("Hello there, a few words to score.\n")
    assert main(["eval", str(base), str(tmp_path / "t.txt"), "--adapter", str(tmp_path / "adapter"), "--json"]) == 0
    with_adapter = json.loads(capsys.readouterr().out)
    assert main(["eval", str(tmp_path / "merged"), str(tmp_path / "t.txt"), "--json"]) == 0
    merged = json.loads(capsys.readouterr().out)
    assert with_adapter[str(tmp_path / "t.txt")]["loss"] == pytest.approx(
        merged[str(tmp_path / "t.txt")]["loss"], abs=1e-5
    )
    assert main(["generate", str(base), "x", "--adapter", str(tmp_path / "missing")]) == 2
    assert "no such adapter folder" in capsys.readouterr().err


def test_serve_takes_an_adapter_and_refuses_a_bad_one_before_listening(base, tmp_path):
    import argparse

    pytest.importorskip("uvicorn")
    from gptforge.errors import NotFoundError
    from gptforge.serve import add_serve_arguments, run_from_args

    args = add_serve_arguments(argparse.ArgumentParser()).parse_args([str(base), "--adapter", str(tmp_path / "none")])
    with pytest.raises(NotFoundError, match="no such adapter folder"):
        run_from_args(args)


def test_python_api_trains_and_reopens_an_adapter(base, tmp_path, sample_text, one_thread):
    from gptforge import GPTForge

    (tmp_path / "t.txt").write_text(sample_text)
    ai = GPTForge(str(base))
    ai.train(
        str(tmp_path / "t.txt"),
        batch_size=2,
        num_steps=2,
        output_dir=tmp_path / "run",
        lora_r=2,
        lora_targets="c_fc",
        eval_interval=0,
        plot=False,
        progress=False,
    )
    assert has_lora(ai.model) and (tmp_path / "run" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "run" / "adapter_config.json").read_text())["target_modules"] == ["mlp.c_fc"]
    again = GPTForge(str(tmp_path / "run"))  # the adapter folder: its base with the adapter merged in
    ai.model.eval()
    x = torch.randint(0, 200, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(again.model(x)[0], ai.model(x)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lora_on_the_mlp_projection_keeps_only_the_activations_input(dropout, monkeypatch):
    """A LoRA c_proj in the MLP computes GELU's output again in the backward pass instead of keeping it (or its
    dropped copy): the same loss and gradients as the plain composition with the same dropout masks, and of the
    (batch, T, 4 x width) activations only GELU's input is kept."""
    import copy

    from gptforge import kernels

    if not kernels.enabled():
        pytest.skip(f"{kernels.SWITCH}=0: the CPU kernels are off")
    monkeypatch.setattr(kernels, "_onednn_faster", lambda: True)  # oneDNN's products where the ops exist, on any vendor
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2))
    apply_lora(model, 4, 8.0, dropout, "c_proj,c_fc")
    _randomise_b(model)
    model.train()
    x = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))

    def run(fused: bool):
        m = copy.deepcopy(model)
        if not fused:
            for block in m.transformer.h:
                block.mlp.c_proj.after_activation = None  # the MLP then calls c_proj(act(u))
        saved = []
        torch.manual_seed(5)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            _, loss = m(x[:, :-1], x[:, 1:])
        loss.backward()
        wide = [t for t in saved if t.is_floating_point() and t.shape == (2, 8, 64)]
        return loss, {n: p.grad for n, p in m.named_parameters() if p.requires_grad}, len(wide)

    loss, grads, wide = run(True)
    plain_loss, plain_grads, plain_wide = run(False)
    torch.testing.assert_close(loss, plain_loss)
    assert grads.keys() == plain_grads.keys() and any(".mlp.c_proj.lora_A" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    # per block: u alone, against u and act(u) (or its dropped copy) where the products are oneDNN's; torch's
    # own product with a frozen weight keeps one of them, as the kernel does
    assert (wide, plain_wide) == (2, 4 if kernels.onednn() else 2)
