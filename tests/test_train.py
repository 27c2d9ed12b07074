"""The training engine: schedule, exact resume, checkpoints, bad input, fine-tuning, the CLI."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch

from gptforge.checkpoint import load_model
from gptforge.config import GPTConfig
from gptforge.model import GPT
from gptforge.train import (
    RunFolderError,
    TrainConfig,
    Trainer,
    TrainingError,
    apply_freeze,
    lr_at,
    parse_duration,
    train,
)
from gptforge.train.optim import configure_optimizer


def tiny_model(vocab: int = 300, dropout: float = 0.1) -> GPT:
    torch.manual_seed(0)
    return GPT(
        GPTConfig(
            vocab_size=vocab,
            n_positions=32,
            n_embd=32,
            n_layer=2,
            n_head=2,
            bos_token_id=0,
            eos_token_id=0,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
        )
    )


def quick(tmp_path, name="run", **kw) -> dict:
    opts = dict(
        out_dir=str(tmp_path / name),
        batch_size=4,
        block_size=16,
        log_interval=2,
        eval_interval=4,
        eval_tokens=512,
        sample_interval=0,
        sample_tokens=8,
        progress=False,
        plot=False,
        save_minutes=None,
    )
    opts.update(kw)
    return opts


def test_parse_duration():
    assert parse_duration("90") == 90 and parse_duration("10m") == 600 and parse_duration("1.5h") == 5400
    with pytest.raises(ValueError, match="--max-time"):
        parse_duration("ten minutes")


def test_schedule_warms_up_and_decays_to_floor():
    cfg = TrainConfig(max_steps=100, learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    assert lr_at(cfg, 0, 0.0) < lr_at(cfg, 5, 0.05) < lr_at(cfg, 9, 0.09) <= 1.0
    assert lr_at(cfg, 50, 0.5) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(cfg, 100, 1.0) == pytest.approx(0.1)
    linear = TrainConfig(max_steps=100, learning_rate=1.0, schedule="linear", warmup_steps=0, min_lr_ratio=0.0)
    assert lr_at(linear, 25, 0.25) == pytest.approx(0.75)
    const = TrainConfig(max_steps=100, learning_rate=2.0, schedule="constant", warmup_steps=0)
    assert lr_at(const, 99, 0.99) == 2.0


def test_bad_options_name_the_option():
    with pytest.raises(ValueError, match="--batch-size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="--schedule"):
        TrainConfig(schedule="exp")


def test_resume_is_the_same_run(tmp_path, dataset):
    """2N steps in one go and N steps + resume to 2N end with bitwise-equal parameters (dropout on)."""
    data, tok = dataset
    full = train(tiny_model(), data, tokenizer=tok, **quick(tmp_path, "full", max_steps=12))
    assert full.step == 12 and not full.interrupted

    def stop_at_6(trainer):
        if trainer.step == 6:
            trainer.request_stop()

    first = train(tiny_model(), data, tokenizer=tok, on_step=stop_at_6, **quick(tmp_path, "split", max_steps=12))
    assert first.interrupted and first.step == 6
    assert (tmp_path / "split" / "checkpoints" / "step-0000006" / "trainer_state.pt").is_file()
    # the resumed process starts from a differently initialised model: everything must come from the checkpoint
    torch.manual_seed(99)
    resumed = train(
        GPT(tiny_model().config), data, tokenizer=tok, **quick(tmp_path, "split", max_steps=12, resume=True)
    )
    assert resumed.step == 12 and not resumed.interrupted

    a = load_model(tmp_path / "full").state_dict()
    b = load_model(tmp_path / "split").state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_run_folder_is_a_transformers_model_with_metrics(tmp_path, dataset):
    transformers = pytest.importorskip("transformers")
    data, tok = dataset
    result = train(tiny_model(), data, tokenizer=tok, **quick(tmp_path, max_steps=8, save_steps=4, keep_checkpoints=1))
    out = tmp_path / "run"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6, 8]
    assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in train_rows)
    assert val_rows and val_rows[-1]["val_perplexity"] == pytest.approx(math.exp(val_rows[-1]["val_loss"]))
    assert val_rows[-1]["val_bits_per_byte"] > 0
    assert result.val_loss == pytest.approx(val_rows[-1]["val_loss"])
    # keep_checkpoints=1: only the latest survives, and no temporary folder is left behind
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000008"]
    assert (out / "best" / "model.safetensors").is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ours = load_model(out)
    x = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, ours(x)[0], atol=1e-4)
    assert transformers.AutoTokenizer.from_pretrained(out)("hello world")["input_ids"] == tok.encode("hello world")


def test_training_lowers_the_loss(tmp_path, dataset):
    data, tok = dataset
    result = train(
        tiny_model(dropout=0.0),
        data,
        tokenizer=tok,
        **quick(tmp_path, max_steps=60, learning_rate=3e-3, eval_interval=None),
    )
    rows = [r for r in result.history if "loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    assert result.val_loss < math.log(300)


def test_a_run_past_its_best_says_which_folder_is_better(tmp_path, dataset, monkeypatch, capsys):
    """When an evaluation beat the final model by more than 2% (a small text learnt by heart), the run says which
    step best/ holds; when the final model is the best, or within 2% of it, it says nothing."""
    from gptforge.train.tasks import LanguageModelling

    data, tok = dataset
    # the last case: periodic evaluations on a part of the validation tokens, the final one on all (not comparable)
    for name, losses, said in (
        ("overfit", [5.0, 4.0, 4.3], True),
        ("close", [5.0, 4.0, 4.05], False),
        ("still_learning", [5.0, 4.5, 4.0], False),
        ("part", [5.0, 4.0, 4.3], False),
    ):
        scripted = iter(losses)  # the evaluations at steps 4 and 8, then the final one at step 10
        monkeypatch.setattr(
            LanguageModelling,
            "evaluate",
            lambda self, model, *, full, trainer: {
                "val_loss": (v := next(scripted)),
                "val_perplexity": math.exp(v),
                "val_tokens": 4096 if full and name == "part" else 512,
            },
        )
        result = train(tiny_model(), data, tokenizer=tok, **quick(tmp_path, name, max_steps=10))
        out = capsys.readouterr().out
        assert result.best_val_loss == min(losses)
        assert result.best_step == (10 if losses[-1] == min(losses) else 8)
        assert ("note: the model of step 8 (val_loss 4.0000) is better on validation" in out) is said, (name, out)
        if said:
            assert str(tmp_path / name / "best") in out
    # the step of best/ is in the checkpoint: a run resumed past it still names it
    name, scripted = "resumed", iter([4.0, 4.5, 4.3])  # step 4, the final evaluation at 8; resumed, the final at 10
    train(tiny_model(), data, tokenizer=tok, **quick(tmp_path, "resumed", max_steps=8))
    capsys.readouterr()
    result = train(tiny_model(), data, tokenizer=tok, **quick(tmp_path, "resumed", max_steps=10, resume=True))
    assert result.best_step == 4 and "note: the model of step 4 (val_loss 4.0000)" in capsys.readouterr().out
    # the final evaluation comes after the last checkpoint: best/ records what it won, so a run resumed to train
    # further does not overwrite the better model it holds with a worse one
    name, scripted = "further", iter([5.0, 4.0, 4.5])  # step 4, the final evaluation at 8; resumed, the final at 12
    train(tiny_model(), data, tokenizer=tok, **quick(tmp_path, "further", max_steps=8))
    saved = (tmp_path / "further" / "best" / "model.safetensors").read_bytes()
    result = train(tiny_model(), data, tokenizer=tok, **quick(tmp_path, "further", max_steps=12, resume=True))
    assert result.best_step == 8 and "note: the model of step 8 (val_loss 4.0000)" in capsys.readouterr().out
    assert (tmp_path / "further" / "best" / "model.safetensors").read_bytes() == saved
    assert json.loads((tmp_path / "further" / "best" / "best_validation.json").read_text()) == {
        "step": 8,
        "metric": "val_loss",
        "score": 4.0,
    }


def _fake_clock(monkeypatch, tick: float = 0.01) -> list[float]:
    """The training loop's clock, advancing `tick` seconds per reading; returns the mutable time."""
    import types

    import gptforge.train.loop as loop

    now = [0.0]

    def perf_counter() -> float:
        now[0] += tick
        return now[0]

    monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=perf_counter))
    return now


def test_tokens_per_second_leave_out_callbacks(tmp_path, dataset, monkeypatch):
    """Time spent outside the steps (here a callback that takes 100 s of a fake clock; evaluations, samples and
    saves alike) is not charged to the next logging window's tokens/s."""
    now = _fake_clock(monkeypatch)
    data, tok = dataset

    def slow_callback(trainer) -> None:
        now[0] += 100.0

    result = train(
        tiny_model(),
        data,
        tokenizer=tok,
        on_step=slow_callback,
        **quick(tmp_path, max_steps=4, log_interval=1, eval_interval=None),
    )
    rows = [r for r in result.history if "tokens_per_s" in r]
    step_seconds = [4 * 16 / r["tokens_per_s"] for r in rows]  # batch 4 x block 16 per step
    assert len(rows) == 4 and max(step_seconds) < 1.0, step_seconds


def test_schedule_follows_whichever_limit_ends_the_run(tmp_path, dataset, monkeypatch):
    """Steps and a time budget together: the deadline comes long before step 5000, and the warmup must not
    be laid over 100 steps the run never takes (it peaked at a fraction of the learning rate)."""
    _fake_clock(monkeypatch)
    data, tok = dataset
    result = train(
        tiny_model(),
        data,
        tokenizer=tok,
        **quick(tmp_path, max_steps=5000, max_time=1.0, learning_rate=1e-3, log_interval=1, eval_interval=None),
    )
    lrs = [r["lr"] for r in result.history if "lr" in r]
    assert result.step < 100 and max(lrs) > 0.9e-3, (result.step, max(lrs))
    assert lrs[-1] < 0.2e-3  # and it still ends decayed at the deadline


def test_evaluate_before_run(tmp_path, dataset):
    from gptforge.data.dataset import load_run_data

    data, tok = dataset
    trainer = Trainer(tiny_model(), load_run_data(data), TrainConfig(**quick(tmp_path, max_steps=2)), tokenizer=tok)
    row = trainer.evaluate()
    assert row["step"] == 0 and row["val_loss"] > 0 and (tmp_path / "run" / "metrics.jsonl").is_file()


def test_refuses_to_overwrite_another_run(tmp_path, dataset):
    data, tok = dataset
    train(tiny_model(), data, tokenizer=tok, **quick(tmp_path, max_steps=2))
    with pytest.raises(RunFolderError, match="--resume.*--overwrite"):
        train(tiny_model(), data, tokenizer=tok, **quick(tmp_path, max_steps=2))
    result = train(tiny_model(), data, tokenizer=tok, **quick(tmp_path, max_steps=2, overwrite=True))
    assert result.step == 2


def test_resume_with_another_config_names_the_difference(tmp_path, dataset):
    data, tok = dataset
    train(tiny_model(), data, tokenizer=tok, **quick(tmp_path, max_steps=2))
    other = GPT(
        GPTConfig(vocab_size=300, n_positions=32, n_embd=64, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    )
    with pytest.raises(RunFolderError, match="n_embd: checkpoint 32 vs now 64"):
        train(other, data, tokenizer=tok, **quick(tmp_path, max_steps=4, resume=True))


def test_bad_block_size_and_vocab(tmp_path, dataset):
    data, tok = dataset
    with pytest.raises(ValueError, match="--block-size 64 is larger than .*n_positions=32"):
        train(tiny_model(), data, tokenizer=tok, **quick(tmp_path, max_steps=2, block_size=64))
    with pytest.raises(ValueError, match=f"has {tok.vocab_size} tokens but the model has vocab_size=100"):
        train(tiny_model(vocab=100), data, tokenizer=tok, **quick(tmp_path, max_steps=2))
    with pytest.raises(ValueError, match="how long"):
        train(tiny_model(), data, tokenizer=tok, **quick(tmp_path, "x"))


def test_nan_loss_stops_with_step_and_checkpoint(tmp_path, dataset):
    data, tok = dataset

    def poison(trainer):
        if trainer.step == 3:
            with torch.no_grad():
                trainer.model.transformer.ln_f.weight.fill_(float("nan"))

    with pytest.raises(TrainingError, match=r"at step 4; the last good checkpoint is .*step-0000002"):
        train(tiny_model(), data, tokenizer=tok, on_step=poison, **quick(tmp_path, max_steps=10, save_steps=2))


def test_ctrl_c_saves_and_resumes(tmp_path, dataset):
    data, tok = dataset

    def interrupt(trainer):
        if trainer.step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN under a shell's `cmd &`
    result = train(tiny_model(), data, tokenizer=tok, on_step=interrupt, **quick(tmp_path, max_steps=8))
    assert result.interrupted and result.step in (3, 4)
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    resumed = train(tiny_model(), data, tokenizer=tok, **quick(tmp_path, max_steps=8, resume=True))
    assert resumed.step == 8


def test_freeze_keeps_frozen_weights(tmp_path, dataset):
    data, tok = dataset
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, data, tokenizer=tok, **quick(tmp_path, max_steps=3, freeze="embeddings,blocks:1"))
    after = model.state_dict()
    assert torch.equal(before["transformer.wte.weight"], after["transformer.wte.weight"])
    assert torch.equal(before["transformer.h.0.mlp.c_fc.weight"], after["transformer.h.0.mlp.c_fc.weight"])
    assert not torch.equal(before["transformer.h.1.mlp.c_fc.weight"], after["transformer.h.1.mlp.c_fc.weight"])
    with pytest.raises(ValueError, match="--freeze 'blocks:9'"):
        apply_freeze(tiny_model(), "blocks:9")
    assert apply_freeze(tiny_model(), "all-but:1") == sum(
        p.numel()
        for n, p in tiny_model().named_parameters()
        if not n.startswith(("transformer.h.1.", "transformer.ln_f"))
    )


def test_max_time_ends_decayed_at_the_deadline(tmp_path, dataset, monkeypatch):
    """The schedule runs over the clock: a fake clock that advances 0.01 s per reading makes it exact."""
    _fake_clock(monkeypatch)
    data, tok = dataset
    result = train(
        tiny_model(),
        data,
        tokenizer=tok,
        **quick(tmp_path, max_time=2.0, learning_rate=1e-3, warmup_steps=0, log_interval=1, eval_interval=None),
    )
    rows = [r for r in result.history if "loss" in r]
    assert result.step > 5 and rows[-1]["elapsed"] >= 2.0 > rows[-2]["elapsed"]
    lrs = [r["lr"] for r in rows]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] > 0.99e-3
    assert lrs[-1] < 0.11e-3  # at the floor (1e-4) when the deadline comes


def test_cli_trains_from_raw_text(tmp_path, corpus):
    from gptforge.cli import main

    out = tmp_path / "cli_run"
    rc = main(
        [
            "train",
            str(corpus),
            "--out",
            str(out),
            "--size",
            "tiny",
            "--n-layer",
            "1",
            "--vocab-size",
            "300",
            "--max-steps",
            "4",
            "--batch-size",
            "2",
            "--block-size",
            "32",
            "--no-progress",
            "--no-plot",
            "--sample-tokens",
            "4",
            "--dropout",
            "0.2",
            "--attn-dropout",
            "0.05",
        ]
    )
    assert rc == 0
    model = load_model(out)
    assert model.config.n_layer == 1 and model.config.n_positions == 32
    assert model.config.resid_pdrop == model.config.embd_pdrop == 0.2 and model.config.attn_pdrop == 0.05
    assert model.config.vocab_size == json.loads((out / "tokenizer.json").read_text())["model"]["vocab"].__len__()
    assert (out / "samples.txt").read_text().count("=== step") >= 1
    assert main(["train", str(corpus), "--out", str(out), "--max-steps", "1"]) == 2  # refuses to overwrite


def test_time_budget_warms_up_over_a_share_of_the_time():
    cfg = TrainConfig(max_time=100, learning_rate=1.0, min_lr_ratio=0.1, schedule="cosine")
    assert lr_at(cfg, 0, 0.0, warmup_share=0.02) == 0.0
    assert lr_at(cfg, 5, 0.01, warmup_share=0.02) == pytest.approx(0.5, rel=1e-3)
    assert lr_at(cfg, 9, 0.5, warmup_share=0.02) == pytest.approx(0.55)


def test_choose_size_follows_the_budget_and_the_data():
    from gptforge.train import SCRATCH_SIZES, TOKENS_PER_PARAM, choose_size

    cpu = 3.7e11  # FLOP/s of matrix products (oneDNN), as measured on a 2-core CPU
    probed = []

    def rate(config, block):  # a step at 40% of the matrix-product rate, without training anything
        probed.append(config.n_embd)
        return 0.4 * cpu / config.flops_per_token(block)

    order = [
        choose_size(10**9, TrainConfig(max_time=t), 5000, flops_per_s=cpu, rate=rate)[0]
        for t in (60, 3 * 3600, 30 * 24 * 3600)
    ]
    assert order[0] == "tiny" and SCRATCH_SIZES.index(order[1]) > 0 and order[2] == "gpt2"
    # More time cannot buy a bigger model for data that a small one already sees many times over.
    assert choose_size(100_000, TrainConfig(max_time=30 * 24 * 3600), 5000, flops_per_s=cpu, rate=rate)[0] == "tiny"
    # A size that could not be fed even at the full matrix-product rate is ruled out without a probe.
    probed.clear()
    size, why = choose_size(10**9, TrainConfig(max_time=60), 5000, flops_per_s=cpu, rate=rate)
    assert size == "tiny" and probed == [128] and "'mini' would see at most" in why
    # The measured rate decides: a machine twice as slow as its matrix products suggest gets a smaller model.
    slow = lambda config, block: rate(config, block) / 8  # noqa: E731
    assert SCRATCH_SIZES.index(
        choose_size(10**9, TrainConfig(max_time=3 * 3600), 5000, flops_per_s=cpu, rate=slow)[0]
    ) < SCRATCH_SIZES.index(order[1])
    # Without a time budget the count of tokens is exact: steps x batch x block, or epochs x data.
    # 1,000 steps x 16 x 128 = 2.0M tokens for tiny (1.45M parameters: 1.4 each, the smallest is always
    # allowed); mini would see 1,000 x 16 x 256 = 4.1M for 7.7M parameters: 0.53 each, below TOKENS_PER_PARAM.
    size, why = choose_size(10**9, TrainConfig(max_steps=1000, batch_size=16), 5000)
    assert (size, TOKENS_PER_PARAM) == ("tiny", 2.0) and "'mini' would see only 0.53 per parameter" in why
    # 10,000 steps: small sees 81.9M tokens (6.4 each); gpt2 would see 164M for its 89.7M parameters: 1.8.
    assert choose_size(10**9, TrainConfig(max_steps=10_000, batch_size=16), 5000)[0] == "small"
    assert choose_size(10**8, TrainConfig(epochs=1), 5000)[0] == "small"  # 100M tokens; gpt2 1.1 each


def test_training_rate_is_measured_on_the_runs_batch_shape():
    from gptforge.train import training_rate

    config = GPTConfig(vocab_size=300, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    fast = training_rate(config, 16, TrainConfig(batch_size=2, device="cpu"))
    assert 0 < fast < float("inf")


@pytest.mark.parametrize("given, expected", [({}, "Muon"), ({"optimizer": "adamw"}, "AdamW")])
def test_training_rate_times_the_optimizer_the_run_will_use(monkeypatch, given, expected):
    """The size choice's rate includes the optimizer step (Muon's orthogonalisation is a tenth of a small
    model's step), with the from-scratch defaults for what the user left unset."""
    from gptforge.train import pipeline

    stepped = []

    def counting(model, cfg, device):
        optimizer = configure_optimizer(model, cfg, device)
        step = optimizer.step
        optimizer.step = lambda *a, **k: (stepped.append(type(optimizer).__name__), step(*a, **k))[1]
        return optimizer

    monkeypatch.setattr(pipeline, "configure_optimizer", counting)
    config = GPTConfig(vocab_size=300, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    pipeline.training_rate(config, 16, TrainConfig(batch_size=2, device="cpu", **given), repeats=2)
    assert stepped == [expected] * 3  # a warm-up and two timed steps


@pytest.mark.parametrize("precision", ["auto", "fp32"])
def test_bf16_products_are_taken_for_the_run_where_calibration_chose_them(
    tmp_path, dataset, monkeypatch, capsys, precision
):
    """--precision auto on a processor whose calibration chose bf16 products: the run's steps and evaluations take
    them (and its description says so), for the run only; --precision fp32 keeps every product fp32."""
    from gptforge import calibrate, kernels

    monkeypatch.setenv(calibrate.OVERRIDE, "bf16=1")
    data, tok = dataset
    seen = []
    real_evaluate = Trainer.evaluate
    monkeypatch.setattr(
        Trainer, "evaluate", lambda self, *a, **k: seen.append(kernels._BF16) or real_evaluate(self, *a, **k)
    )
    on_step = lambda trainer: seen.append(kernels._BF16)  # noqa: E731
    result = train(
        tiny_model(), data, tokenizer=tok, on_step=on_step, **quick(tmp_path, max_steps=4, precision=precision)
    )
    assert result.step == 4 and len(seen) >= 5 and set(seen) == {precision == "auto"} and not kernels._BF16
    assert ("products from bf16 inputs" in capsys.readouterr().out) == (precision == "auto")
