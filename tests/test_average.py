"""--ema: an exponential moving average of the weights, used for evaluations, best/ and the final model,
carried exactly through a checkpoint and --resume."""

from __future__ import annotations

import pytest
import torch

from gptforge import GPT, GPTConfig
from gptforge.checkpoint import load_model
from gptforge.errors import CheckpointError, OptionError
from gptforge.train import TrainConfig, train
from gptforge.train.average import WeightAverage

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
OPTS = dict(
    batch_size=4,
    block_size=16,
    log_interval=2,
    eval_interval=4,
    eval_tokens=512,
    sample_interval=0,
    progress=False,
    plot=False,
    save_minutes=None,
    max_steps=8,
)


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**SMALL))


def test_the_average_follows_the_formula_and_leaves_frozen_weights_out():
    model = _model()
    model.transformer.wpe.weight.requires_grad_(False)
    avg = WeightAverage(model, 0.9)
    assert "transformer.wpe.weight" not in dict(avg.named)
    w = model.lm_head.weight
    expected = w.detach().clone()
    for n in range(1, 30):
        with torch.no_grad():
            w.add_(torch.randn_like(w))
        avg.update()
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * w.detach()
    own = w.detach().clone()
    other = WeightAverage(_model(), 0.9)  # every weight trains: wpe too, which this average lacks
    with pytest.raises(CheckpointError, match="--ema.*transformer.wpe.weight"):
        other.load_state_dict(avg.state_dict())
    with avg.applied():
        torch.testing.assert_close(w.detach(), expected)
    assert torch.equal(w.detach(), own)  # the model's own weights come back


def test_ema_run_saves_the_average_and_resumes_exactly(tmp_path, dataset):
    data, tok = dataset
    model = _model()
    full = train(model, data, tokenizer=tok, out_dir=str(tmp_path / "full"), ema=0.8, **OPTS)
    plain = train(_model(), data, tokenizer=tok, out_dir=str(tmp_path / "plain"), ema=0, **OPTS)  # no average
    # the final folder holds the average, the last checkpoint the weights the steps reached
    saved = load_model(tmp_path / "full").state_dict()
    last = load_model(next((tmp_path / "full" / "checkpoints").iterdir())).state_dict()
    assert torch.equal(last["lm_head.weight"], load_model(tmp_path / "plain").state_dict()["lm_head.weight"])
    assert not torch.equal(saved["lm_head.weight"], last["lm_head.weight"])
    assert full.val_loss != plain.val_loss  # the evaluation is of the average
    for k, v in model.state_dict().items():  # and the caller's model is the one saved (GPTForge.train, then generate)
        assert torch.equal(v, saved[k]), k

    def stop_at_5(trainer):
        if trainer.step == 5:
            trainer.request_stop()

    train(_model(), data, tokenizer=tok, out_dir=str(tmp_path / "split"), ema=0.8, on_step=stop_at_5, **OPTS)
    torch.manual_seed(7)
    train(GPT(_model().config), data, tokenizer=tok, out_dir=str(tmp_path / "split"), ema=0.8, resume=True, **OPTS)
    resumed = load_model(tmp_path / "split").state_dict()
    for k in saved:
        assert torch.equal(saved[k], resumed[k]), k


def test_resuming_with_ema_changed_says_what_happens_to_the_average(tmp_path, dataset, capsys):
    """A checkpoint without an average resumed with --ema averages from the resumed weights; one with an
    average resumed with --ema 0 drops it and saves the weights; both say so when they resume."""
    data, tok = dataset

    def stop_at_5(trainer):
        if trainer.step == 5:
            trainer.request_stop()

    plain = train(_model(), data, tokenizer=tok, out_dir=str(tmp_path / "plain"), ema=0, **OPTS)  # no average
    for first, then in ((0, 0.8), (0.8, 0)):
        out = str(tmp_path / f"from-{first}")
        train(_model(), data, tokenizer=tok, out_dir=out, ema=first, on_step=stop_at_5, **OPTS)
        capsys.readouterr()
        result = train(GPT(_model().config), data, tokenizer=tok, out_dir=out, ema=then, resume=True, **OPTS)
        said = capsys.readouterr()
        if then:
            assert (
                "--ema: the checkpoint holds no weight average, so it starts from the resumed weights"
                in said.out + said.err
            )
            assert result.val_loss != plain.val_loss  # evaluated on an average of steps 6-8 only
        else:
            assert "weight average (--ema) is dropped" in said.out + said.err
            saved = load_model(out).state_dict()
            assert torch.equal(saved["lm_head.weight"], load_model(tmp_path / "plain").state_dict()["lm_head.weight"])


def test_bad_decay_is_refused():
    for bad in (1.0, 1.5, -0.1):
        with pytest.raises(OptionError, match="--ema"):
            TrainConfig(ema=bad)
    with pytest.raises(OptionError, match="--ema"):
        TrainConfig(ema=0.99, fsdp=True)
