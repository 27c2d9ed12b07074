"""At home in the Hugging Face ecosystem: folder metadata, generation defaults, data formats, --config,
grouped help, progress lines, external loggers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from gptforge.checkpoint import load_model, save_model
from gptforge.cli import main
from gptforge.config import GPTConfig
from gptforge.data.formats import HFDataset
from gptforge.data.reading import iter_texts
from gptforge.data.vocabulary import train_tokenizer
from gptforge.errors import DataError, NotFoundError, OptionError
from gptforge.model import GPT
from gptforge.options import TrainConfig, parse_duration
from gptforge.tokenizer import Tokenizer, load_tokenizer

WORDS = "the cat sat on a mat while dogs ran fast and birds sang over green hills".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    import random

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    docs = [" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(300)]
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, corpus) -> Path:
    """A tiny model folder (context 32) with a trained tokenizer."""
    tok = train_tokenizer([str(corpus)], vocab_size=300, out_dir=None)
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(vocab_size=300, n_positions=32, n_embd=32, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    )
    folder = tmp_path_factory.mktemp("model")
    save_model(model, folder, tok)
    return folder


# --- model folders -----------------------------------------------------------------------------------


def test_folder_declares_context_pad_token_and_sampling_defaults(model_dir):
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert tok_config["model_max_length"] == 32  # the model's n_positions, not GPT-2's 1024
    assert tok_config["pad_token"] == "<|endoftext|>"
    assert json.loads((model_dir / "special_tokens_map.json").read_text())["pad_token"] == "<|endoftext|>"
    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert gen["pad_token_id"] == 0 and gen["do_sample"] is True and gen["top_k"] == 50 and gen["max_new_tokens"] == 100


def test_transformers_pipeline_batches_and_samples_like_gptforge(model_dir):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert tok.model_max_length == 32 and tok.pad_token == "<|endoftext|>"
    gen = transformers.GenerationConfig.from_pretrained(model_dir)
    assert gen.do_sample and gen.top_k == 50 and gen.pad_token_id == 0
    pipe = transformers.pipeline("text-generation", model=str(model_dir), device="cpu")
    out = pipe(["the cat", "a dog ran"], batch_size=2, max_new_tokens=3)
    assert len(out) == 2


def _dict_of_calls(monkeypatch) -> dict:
    import gptforge.generate

    seen = {}

    def fake(model, tokenizer, prompts, **kw):
        seen.update(kw)
        return ["x"] * len(prompts)

    monkeypatch.setattr(gptforge.generate, "generate", fake)
    return seen


def test_generate_takes_its_defaults_from_the_folder_and_flags_win(tmp_path, model_dir, monkeypatch, capsys):
    folder = tmp_path / "m"
    folder.mkdir()
    for f in model_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    gen = json.loads((folder / "generation_config.json").read_text())
    gen.update(top_k=7, temperature=0.5, max_new_tokens=12)
    (folder / "generation_config.json").write_text(json.dumps(gen))
    seen = _dict_of_calls(monkeypatch)
    assert main(["generate", str(folder), "the", "--seed", "1", "--no-stream"]) == 0
    assert seen["top_k"] == 7 and seen["temperature"] == 0.5 and seen["max_new_tokens"] == 12
    # a flag wins, even one given with gptforge's own default value
    assert (
        main(["generate", str(folder), "the", "--seed", "1", "--top-k", "50", "--max-new-tokens", "3", "--no-stream"])
        == 0
    )
    assert seen["top_k"] == 50 and seen["max_new_tokens"] == 3 and seen["temperature"] == 0.5


def test_fine_tuning_keeps_the_incoming_folder_metadata(tmp_path, model_dir, corpus):
    from gptforge.train.pipeline import run_training

    base = tmp_path / "base"
    tok = load_tokenizer(model_dir)
    from tokenizers import AddedToken

    tok.hf_tokenizer.add_special_tokens([AddedToken("<|pad|>", special=True, normalized=False)])
    tok = Tokenizer(tok.hf_tokenizer)
    model = GPT(
        GPTConfig(vocab_size=301, n_positions=32, n_embd=32, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    )
    save_model(model, base, tok)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.update(
        pad_token="<|pad|>", model_max_length=24, chat_template="{% for m in messages %}{{ m.content }}{% endfor %}"
    )
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    gen = json.loads((base / "generation_config.json").read_text())
    gen.update(top_k=7, repetition_penalty=1.3)
    (base / "generation_config.json").write_text(json.dumps(gen))

    run_training(
        [str(corpus)],
        init=str(base),
        out_dir=str(tmp_path / "run"),
        max_steps=2,
        batch_size=2,
        block_size=16,
        eval_interval=0,
        sample_interval=0,
        progress=False,
        plot=False,
        save_minutes=None,
        log=lambda m: None,
    )
    out = tmp_path / "run"
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert (
        config["pad_token"] == "<|pad|>" and config["model_max_length"] == 24 and "messages" in config["chat_template"]
    )
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["top_k"] == 7 and gen["repetition_penalty"] == 1.3 and gen["pad_token_id"] == 300
    assert load_model(out).generation_config["top_k"] == 7
    resolved = json.loads((out / "run_config.json").read_text())
    assert resolved["options"]["init"] == str(base) and resolved["resolved"]["train"]["learning_rate"] == 5e-5


# --- data in the forms people have --------------------------------------------------------------------


def test_json_arrays_of_strings_and_objects(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(["first text", "second text"]))
    (tmp_path / "b.json").write_text(json.dumps([{"body": "an object's text"}, {"body": "more"}]))
    assert list(iter_texts([tmp_path / "a.json"])) == ["first text", "second text"]
    assert list(iter_texts([tmp_path / "b.json"], field="body")) == ["an object's text", "more"]
    (tmp_path / "c.json").write_text('{"text": "one"}\n{"text": "two"}\n')  # JSON Lines under a .json name
    assert list(iter_texts([tmp_path / "c.json"])) == ["one", "two"]
    (tmp_path / "d.json").write_text(json.dumps({"data": ["x"]}))
    with pytest.raises(DataError, match=r"d\.json: holds an object .* not an array"):
        list(iter_texts([tmp_path / "d.json"]))


def test_a_field_of_chat_messages_says_what_to_do(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    (tmp_path / "chat.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    with pytest.raises(DataError, match="list of chat messages.*one string.*--field"):
        list(iter_texts([tmp_path / "chat.jsonl"], field="messages"))


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [1, 2, 3], "content": ["alpha", "beta", " "]}), tmp_path / "t.parquet")
    assert list(iter_texts([tmp_path], column="content")) == ["alpha", "beta"]  # folders include .parquet
    with pytest.raises(DataError, match="no column 'text'.*--field"):
        list(iter_texts([tmp_path / "t.parquet"]))


def test_hf_dataset_from_a_local_folder_offline(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    d = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["one doc", "two doc"]}),
            "test": datasets.Dataset.from_dict({"text": ["held out"]}),
        }
    )
    d.save_to_disk(str(tmp_path / "ds"))
    assert list(iter_texts([HFDataset(str(tmp_path / "ds"), "train")])) == ["one doc", "two doc"]
    assert list(iter_texts([HFDataset(str(tmp_path / "ds"), "test")])) == ["held out"]
    with pytest.raises(DataError, match="no split 'validation'"):
        list(iter_texts([HFDataset(str(tmp_path / "ds"), "validation")]))
    a = HFDataset(str(tmp_path / "ds"), "train").fingerprint()
    assert (
        a
        == HFDataset(str(tmp_path / "ds"), "train").fingerprint()
        != HFDataset(str(tmp_path / "ds"), "test").fingerprint()
    )


def test_prepare_reads_an_hf_dataset(tmp_path, model_dir):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": [" ".join(WORDS[i:] + WORDS[:i]) for i in range(16)] * 4}).save_to_disk(
        str(tmp_path / "ds")
    )
    assert (
        main(
            [
                "prepare",
                "--hf-dataset",
                str(tmp_path / "ds"),
                "--tokenizer",
                str(model_dir),
                "--out",
                str(tmp_path / "data"),
                "--quiet",
            ]
        )
        == 0
    )
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["train"]["tokens"] > 0 and meta["inputs"][0]["path"].endswith("[train]")


# --- options ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,seconds",
    [
        ("1h30m", 5400),
        ("90min", 5400),
        ("45s", 45),
        ("2h", 7200),
        ("1.5h", 5400),
        ("10m", 600),
        ("90", 90),
        ("1h 30m", 5400),
    ],
)
def test_durations_as_people_write_them(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["ten minutes", "1x", "-5m", "0s", "m"])
def test_bad_durations_name_the_option(text):
    with pytest.raises(OptionError, match="--max-time"):
        parse_duration(text)


def test_report_to_is_checked_by_name_and_install():
    with pytest.raises(OptionError, match="--report-to.*comet.*choose from tensorboard, wandb, mlflow"):
        TrainConfig(report_to="comet")
    assert TrainConfig(report_to="wandb, mlflow", tensorboard=True).reporters == ["wandb", "mlflow", "tensorboard"]


def test_a_missing_logger_fails_before_any_work(tmp_path, corpus, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert main(["train", str(corpus), "--report-to", "wandb", "--out", str(tmp_path / "run"), "--max-steps", "1"]) == 2
    assert "--report-to wandb needs the wandb package: pip install 'gptforge[wandb]'" in capsys.readouterr().err
    assert not (tmp_path / "run" / "tokenizer").exists()  # nothing was built


def test_train_help_is_grouped_with_choices_and_examples(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for group in (
        "data:",
        "reading and cleaning:",
        "model:",
        "length:",
        "batch and optimizer:",
        "precision and speed:",
        "evaluation and samples:",
        "checkpoints and output:",
        "logging:",
        "examples:",
    ):
        assert f"\n{group}" in out, group
    assert "--size {gpt2," in out and "--schedule {cosine,linear,constant,wsd}" in out and "--field FIELD" in out
    flat = " ".join(out.split())
    assert (
        "sequences per micro-step (per process) (default: 16)" in flat
        and "torch.compile the model (default: off)" in flat
    )
    assert "(default: None)" not in flat and "(default: )" not in flat
    assert not re.search(r"\(default[^()]*\)\s*\(default", flat)  # never twice in one help text


def test_config_file_with_flags_winning(tmp_path, monkeypatch):
    import gptforge.train.pipeline as pipeline

    seen = {}
    monkeypatch.setattr(pipeline, "run_training", lambda inputs, **kw: seen.update(kw, inputs=inputs) or _Result())
    (tmp_path / "run.yaml").write_text(
        "lr: 3.0e-4\nmax-time: 1h30m\nbatch_size: 8\nfield: body\ndedupe: true\ninputs: [a.txt, b.txt]\nsize: tiny\n"
    )
    assert (
        main(["train", "--config", str(tmp_path / "run.yaml"), "--batch-size", "16", "--out", str(tmp_path / "r")]) == 0
    )
    assert seen["learning_rate"] == 3e-4 and seen["max_time"] == 5400 and seen["batch_size"] == 16
    assert seen["inputs"] == ["a.txt", "b.txt"] and seen["size"] == "tiny"
    assert seen["read_options"]["field"] == "body" and seen["read_options"]["dedupe"] is True
    (tmp_path / "bad.json").write_text(json.dumps({"learning_rat": 1}))
    assert main(["train", "--config", str(tmp_path / "bad.json")]) == 2
    (tmp_path / "bad2.json").write_text(json.dumps({"schedule": "wavy"}))
    assert main(["train", "--config", str(tmp_path / "bad2.json")]) == 2


class _Result:
    val_loss, interrupted = None, False


def test_config_errors_name_the_file(tmp_path, capsys):
    (tmp_path / "bad.json").write_text(json.dumps({"learning_rat": 1}))
    main(["train", "--config", str(tmp_path / "bad.json")])
    err = capsys.readouterr().err
    assert "bad.json: unknown option 'learning_rat'" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(NotFoundError):
        from gptforge.configfile import read_config_file

        read_config_file(str(tmp_path / "missing.yaml"))


# --- progress and logging --------------------------------------------------------------------------------


def test_plain_progress_lines_without_a_terminal(capsys):
    from gptforge.train.logging import StepProgress

    bar = StepProgress(max_steps=2000, max_time=None, main=True, bar=True)  # stderr is captured: not a terminal
    assert bar.lines and bar.bar is None
    bar.show(120, 3.41, 9.6e-4, 9352.4, 83.0)
    bar.show(130, 3.40, 9.5e-4, 9352.4, 90.0)  # within LINE_SECONDS: kept for later
    bar.close()
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == "step 120/2,000 | loss 3.41 | lr 9.6e-04 | 9,352 tok/s | 1:23 elapsed | 21:40 left"
    assert lines[-1].startswith("step 130/2,000") and "\r" not in "".join(lines)


def test_time_left_under_max_time_never_goes_negative():
    from gptforge.train.logging import StepProgress

    bar = StepProgress(max_steps=None, max_time=600, main=True, bar=False)
    assert bar.left(10, 60) == 540 and bar.left(99, 700) == 0
    both = StepProgress(max_steps=100, max_time=600, main=True, bar=False)
    assert both.left(50, 60) == 60  # at this pace the steps end first


def test_loss_picture_marks_the_final_evaluation(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from gptforge.train.logging import RunLog

    log = RunLog(tmp_path, plot=True)
    for step in (10, 20):
        log.record({"step": step, "loss": 4.0 - step / 10, "lr": 1e-3})
        log.record(
            {
                "step": step,
                "val_loss": 3.9 - step / 10,
                "val_perplexity": 1.0,
                "val_bits_per_byte": 1.5,
                "val_tokens": 512,
            }
        )
    log.record({"step": 20, "val_loss": 1.95, "val_perplexity": 1.0, "val_bits_per_byte": 1.4, "val_tokens": 5000})
    log.plot()
    assert (tmp_path / "loss.png").stat().st_size > 10_000


def test_missing_matplotlib_is_said_once(tmp_path, monkeypatch, capsys):
    import builtins

    from gptforge.train.logging import RunLog

    real = builtins.__import__
    monkeypatch.setattr(
        builtins,
        "__import__",
        lambda name, *a, **k: (
            (_ for _ in ()).throw(ImportError(name)) if name.startswith("matplotlib") else real(name, *a, **k)
        ),
    )
    log = RunLog(tmp_path)
    log.plot()
    log.plot()
    assert capsys.readouterr().out.count("matplotlib cannot be imported") == 1


def _log_rows(tmp_path, reporter: str) -> None:
    from gptforge.train.logging import RunLog

    log = RunLog(tmp_path / "run", report_to=[reporter], plot=False, config={"learning_rate": 1e-3})
    log.record({"step": 1, "loss": 3.5, "lr": 1e-3})
    log.record({"step": 2, "val_loss": 3.0, "val_bits_per_byte": None})
    log.close()


def test_a_logger_that_fails_is_switched_off_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    from gptforge.train.logging import RunLog

    def broken(self, scalars, step):
        raise RuntimeError("the tracking store is in maintenance mode")

    monkeypatch.setattr(RunLog, "_to_mlflow", broken)
    log = RunLog(tmp_path / "run", plot=False)
    log.reporters = ["mlflow"]  # as check_reporters leaves it when the package imports
    log.record({"step": 1, "loss": 3.5})
    log.record({"step": 2, "loss": 3.4})  # used to end the run at its first row
    assert log.reporters == [] and len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    said = capsys.readouterr()
    assert (said.out + said.err).count("warning: --report-to mlflow failed (RuntimeError: the tracking store") == 1


@pytest.mark.slow
def test_report_to_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _log_rows(tmp_path, "wandb")
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert runs and list(runs[0].glob("*.wandb"))


@pytest.mark.slow
def test_report_to_mlflow_local_store(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a local folder store (mlflow-skinny has no SQL store)
    _log_rows(tmp_path, "mlflow")
    client = mlflow.tracking.MlflowClient()
    run = client.search_runs([client.get_experiment_by_name("Default").experiment_id])[0]
    assert run.data.metrics["loss"] == 3.5 and run.data.metrics["val_loss"] == 3.0
    assert run.data.params["learning_rate"] == "0.001"


def test_report_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    _log_rows(tmp_path, "tensorboard")
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
