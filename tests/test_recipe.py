"""The from-scratch recipe's parts: Muon, the warmup-stable-decay schedule, zero-initialised projections,
an untied output head and squared ReLU (the last two through transformers both ways)."""

from __future__ import annotations

import pytest
import torch
from conftest import LazyTransformers

from gptforge import GPT, GPTConfig, options
from gptforge.checkpoint import load_model, save_model
from gptforge.errors import OptionError
from gptforge.options import SCRATCH_DEFAULTS
from gptforge.train import TrainConfig, Trainer, load_run_data, lr_at, train
from gptforge.train.optim import Muon, configure_optimizer, orthogonalize
from gptforge.train.pipeline import zero_output_projections

transformers = LazyTransformers()
SMALL = dict(
    vocab_size=300,
    n_positions=32,
    n_embd=32,
    n_layer=2,
    n_head=2,
    bos_token_id=0,
    eos_token_id=0,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
)


def _model(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**SMALL, **overrides}))


@pytest.mark.parametrize("shape", [(96, 32), (32, 128), (40, 40)])
def test_orthogonalize_flattens_the_singular_values(shape):
    g = torch.randn(*shape) * torch.logspace(-1, 0, shape[1])  # columns of scales ten times apart
    s = torch.linalg.svdvals(orthogonalize(g))
    assert s.min() > 0.5 and s.max() < 1.3, s
    # the same directions: the update correlates with the gradient's best rank-one part
    u, _, v = torch.linalg.svd(g, full_matrices=False)
    top = u[:, :1] @ v[:1]
    assert (orthogonalize(g) * top).sum() > 0.5


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    model = _model()
    opt = configure_optimizer(
        model,
        TrainConfig(optimizer="muon", learning_rate=1e-3, muon_lr=0.02, weight_decay=0.1, beta2=0.95),
        torch.device("cpu"),
    )
    assert isinstance(opt, Muon)
    by_group = {id(p): g for g in opt.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    for name, p in names.items():
        muon = bool(by_group[id(p)].get("muon"))
        assert muon == (p.dim() == 2 and name.startswith("transformer.h.")), name
    assert by_group[id(names["transformer.h.0.attn.c_attn.weight"])]["split"] == 3
    assert by_group[id(names["transformer.h.0.mlp.c_fc.weight"])]["lr_ratio"] == pytest.approx(0.02 / 1e-3)
    assert by_group[id(names["transformer.h.0.ln_1.weight"])]["weight_decay"] == 0.0


def test_muon_step_orthogonalises_the_momentum_and_adamw_steps_the_rest():
    model = _model()
    opt = configure_optimizer(
        model,
        TrainConfig(optimizer="muon", learning_rate=1e-2, muon_lr=0.05, weight_decay=0.0, beta2=0.95),
        torch.device("cpu"),
    )
    for g in opt.param_groups:
        g["lr"] = 1e-2 * g.get("lr_ratio", 1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 300, (4, 17), generator=torch.Generator().manual_seed(1))
    _, loss = model(ids[:, :-1], ids[:, 1:])
    loss.backward()
    fc = model.transformer.h[1].mlp.c_fc.weight
    grad = fc.grad.clone()
    opt.step()
    # first step: momentum buffer = 0.05 g, Nesterov mix = 0.95 g + 0.05 * 0.05 g, orthogonalised, scaled
    expected = orthogonalize(grad * (0.95 + 0.05 * 0.05)) * 0.05 * max(1.0, fc.size(0) / fc.size(1)) ** 0.5
    torch.testing.assert_close(before["transformer.h.1.mlp.c_fc.weight"] - fc.detach(), expected, atol=1e-5, rtol=1e-4)
    assert not torch.equal(before["transformer.wte.weight"], model.transformer.wte.weight)  # AdamW's part moved too
    assert "exp_avg" in opt.state[model.transformer.wte.weight] and "momentum_buffer" in opt.state[fc]


def test_muon_trains_and_resumes_exactly(tmp_path, dataset):
    data, tok = dataset
    opts = dict(
        batch_size=4,
        block_size=16,
        log_interval=2,
        eval_interval=4,
        eval_tokens=512,
        sample_interval=0,
        progress=False,
        plot=False,
        save_minutes=None,
        optimizer="muon",
        schedule="wsd",
        min_lr_ratio=0.0,
        max_steps=10,
    )
    full = train(_model(), data, tokenizer=tok, out_dir=str(tmp_path / "full"), **opts)
    assert full.history[0]["loss"] > full.history[-1].get("loss", full.val_loss)

    def stop_at_5(trainer):
        if trainer.step == 5:
            trainer.request_stop()

    train(_model(), data, tokenizer=tok, out_dir=str(tmp_path / "split"), on_step=stop_at_5, **opts)
    torch.manual_seed(7)
    train(GPT(_model().config), data, tokenizer=tok, out_dir=str(tmp_path / "split"), resume=True, **opts)
    a, b = load_model(tmp_path / "full").state_dict(), load_model(tmp_path / "split").state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_muon_refuses_fsdp():
    with pytest.raises(OptionError, match="--optimizer muon"):
        TrainConfig(optimizer="muon", fsdp=True)
    with pytest.raises(OptionError, match="--optimizer"):
        TrainConfig(optimizer="sgd")


def test_wsd_schedule_is_flat_then_decays_linearly_to_the_floor():
    cfg = TrainConfig(max_steps=100, learning_rate=1.0, schedule="wsd", cooldown=0.4, warmup_steps=0, min_lr_ratio=0.0)
    assert lr_at(cfg, 10, 0.1) == lr_at(cfg, 59, 0.59) == 1.0
    assert lr_at(cfg, 80, 0.8) == pytest.approx(0.5)
    assert lr_at(cfg, 100, 1.0) == pytest.approx(0.0)
    floor = TrainConfig(
        max_steps=100, learning_rate=1.0, schedule="wsd", cooldown=0.5, warmup_steps=0, min_lr_ratio=0.2
    )
    assert lr_at(floor, 75, 0.75) == pytest.approx(0.6) and lr_at(floor, 100, 1.0) == pytest.approx(0.2)
    with pytest.raises(OptionError, match="--cooldown"):
        TrainConfig(cooldown=1.5)


def test_zero_init_starts_every_block_as_the_identity():
    model = _model()
    zero_output_projections(model)
    ids = torch.randint(0, 300, (2, 9))
    x = model.transformer.wte(ids) + model.transformer.wpe(torch.arange(9))
    with torch.no_grad():
        for block in model.transformer.h:
            torch.testing.assert_close(block(x), x)
    # the gradient still reaches the projections (they are zero, not frozen)
    _, loss = model(ids[:, :-1], ids[:, 1:])
    loss.backward()
    assert model.transformer.h[0].mlp.c_proj.weight.grad.abs().sum() > 0


def test_cli_flags_reach_the_model_and_the_optimizer(tmp_path, corpus):
    from gptforge.cli import main

    out = tmp_path / "run"
    code = main(
        [
            "train",
            str(corpus),
            "--out",
            str(out),
            "--max-steps",
            "3",
            "--size",
            "tiny",
            "--n-layer",
            "1",
            "--block-size",
            "16",
            "--batch-size",
            "2",
            "--no-progress",
            "--no-plot",
            "--vocab-size",
            "300",
            "--activation",
            "relu2",
            "--no-tie-embeddings",
            "--optimizer",
            "muon",
            "--zero-init",
        ]
    )
    assert code == 0
    config = GPTConfig.load(out)
    assert config.activation_function == "relu2" and config.tie_word_embeddings is False
    log = (out / "train.log").read_text() if (out / "train.log").exists() else ""
    run = (out / "run_config.json").read_text()
    assert '"optimizer": "muon"' in run and '"zero_init": true' in run, log


@pytest.mark.parametrize(
    "overrides",
    [
        dict(tie_word_embeddings=False),
        dict(activation_function="relu2"),
        dict(tie_word_embeddings=False, activation_function="relu2"),
    ],
)
def test_untied_head_and_relu2_round_trip_through_transformers(tmp_path, overrides):
    model = _model(**overrides).eval()
    with torch.no_grad():
        model.lm_head.weight.add_(0.01)  # untied: the head differs from wte; tied: both move together
    assert (model.lm_head.weight is model.transformer.wte.weight) == overrides.get("tie_word_embeddings", True)
    save_model(model, tmp_path / "ours")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours").eval()
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        ours = model(ids)[0]
        torch.testing.assert_close(hf(ids).logits, ours, atol=1e-5, rtol=1e-4)
    hf.save_pretrained(tmp_path / "theirs")
    back = load_model(tmp_path / "theirs")
    assert back.config.tie_word_embeddings == overrides.get("tie_word_embeddings", True)
    with torch.no_grad():
        torch.testing.assert_close(back(ids)[0], ours, atol=1e-5, rtol=1e-4)


def test_a_head_that_differs_from_wte_in_a_tied_config_is_an_error(tmp_path):
    from gptforge.errors import CheckpointError

    model = _model(tie_word_embeddings=False)
    save_model(model, tmp_path / "m")
    config = tmp_path / "m" / "config.json"
    config.write_text(config.read_text().replace('"tie_word_embeddings": false', '"tie_word_embeddings": true'))
    with pytest.raises(CheckpointError, match="tie_word_embeddings"):
        load_model(tmp_path / "m")


def test_classifier_from_an_untied_language_model_round_trips_through_transformers(tmp_path):
    from gptforge.classify import from_language_model, load_classifier, save_classifier

    lm = _model(tie_word_embeddings=False)
    with torch.no_grad():
        lm.lm_head.weight.add_(0.01)
    clf = from_language_model(lm, ["a", "b", "c"], pad_token_id=0).eval()
    save_classifier(clf, tmp_path / "ours")
    ids = torch.randint(1, 300, (2, 10))
    with torch.no_grad():
        ours = clf(ids)
        back = load_classifier(tmp_path / "ours")  # our folder keeps the LM head (the auxiliary loss reads it)
        torch.testing.assert_close(back(ids), ours)
        assert torch.equal(back.lm_head.weight, lm.lm_head.weight)
        hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "ours").eval()
        torch.testing.assert_close(hf(ids).logits, ours, atol=1e-5, rtol=1e-4)
        hf.save_pretrained(tmp_path / "theirs")  # transformers keeps no LM head: wte stands in for it
        theirs = load_classifier(tmp_path / "theirs")
        torch.testing.assert_close(theirs(ids), ours, atol=1e-5, rtol=1e-4)
        assert torch.equal(theirs.lm_head.weight, theirs.transformer.wte.weight)


def test_from_scratch_defaults_are_muon_wsd_and_fine_tuning_keeps_adamw(tmp_path, dataset, monkeypatch):
    data, tok = dataset
    quick = dict(
        max_steps=4,
        batch_size=2,
        block_size=16,
        eval_interval=0,
        sample_interval=0,
        progress=False,
        plot=False,
        save_minutes=None,
    )

    def resolved(name, finetune=False, **given):
        trainer = Trainer(
            _model(),
            load_run_data(data),
            TrainConfig(out_dir=str(tmp_path / name), **quick, **given),
            tokenizer=tok,
            finetune=finetune,
        )
        c = trainer.cfg
        return (c.optimizer, c.schedule, c.min_lr_ratio, c.learning_rate, c.ema), trainer

    scratch, trainer = resolved("scratch")
    assert scratch == ("muon", "wsd", 0.0, 2e-3, 0.995)
    assert isinstance(trainer.optimizer, Muon) and trainer.average is not None
    tuned, trainer = resolved("tuned", finetune=True)
    assert tuned == ("adamw", "cosine", 0.1, 5e-5, 0.0)
    assert not isinstance(trainer.optimizer, Muon) and trainer.average is None
    given = resolved("own", optimizer="adamw", schedule="cosine", ema=0)  # given ones win; ema 0 is no average
    assert given[0] == ("adamw", "cosine", 0.0, 2e-3, 0) and given[1].average is None
    assert resolved("sharded", fsdp=True)[0] == ("adamw", "wsd", 0.0, 2e-3, 0.0)  # --fsdp: whole matrices

    # a run begun by the version before (defaults AdamW 1e-3, cosine to 0.1, and no ema: None) resumes as it began
    former = dict(optimizer="adamw", schedule="cosine", min_lr_ratio=0.1, learning_rate=1e-3)
    with monkeypatch.context() as m:
        scratch = {**{k: v for k, v in SCRATCH_DEFAULTS.items() if k != "ema"}, **former}
        m.setattr(options.train, "SCRATCH_DEFAULTS", scratch)  # where unset_defaults reads them
        train(
            _model(),
            data,
            tokenizer=tok,
            out_dir=str(tmp_path / "old"),
            on_step=lambda t: t.step == 2 and t.request_stop(),
            **quick,
        )
    former["ema"] = None
    again = Trainer(
        _model(), load_run_data(data), TrainConfig(out_dir=str(tmp_path / "old"), resume=True, **quick), tokenizer=tok
    )
    c = again.cfg
    assert (c.optimizer, c.schedule, c.min_lr_ratio, c.learning_rate, c.ema) == tuple(former.values())
    assert not isinstance(again.optimizer, Muon) and again.average is None
