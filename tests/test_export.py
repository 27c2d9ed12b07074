"""`gptforge export RUN DIR`: the model files and a model card, never the run's data or checkpoints."""

from __future__ import annotations

import json

import pytest

from gptforge.cli import main
from gptforge.errors import NotFoundError, RunFolderError
from gptforge.export import export_model, model_card


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished run trained from raw text: data/, checkpoints/, best/, metrics, samples and the model."""
    import random

    from gptforge.train.pipeline import run_training

    rng = random.Random(1)
    root = tmp_path_factory.mktemp("export")
    words = "a recipe calls for flour sugar eggs and butter mixed slowly then baked until golden".split()
    (root / "recipes.txt").write_text(
        "\n\n".join(" ".join(rng.choice(words) for _ in range(14)) for _ in range(200)) + "\n"
    )
    run_training(
        [str(root / "recipes.txt")],
        out_dir=str(root / "run"),
        size="tiny",
        vocab_size=300,
        block_size=32,
        max_steps=4,
        batch_size=2,
        eval_interval=2,
        eval_tokens=64,
        sample_tokens=8,
        progress=False,
        save_minutes=None,
        log=lambda m: None,
        model_overrides={"n_positions": 32, "n_layer": 1},
    )
    return root / "run"


def test_export_has_the_model_and_a_card_but_no_data(run, tmp_path):
    out = export_model(run, tmp_path / "out", license="mit")
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
    } <= names
    assert not names & {"data", "checkpoints", "best", "metrics.jsonl", "samples.txt", "run_config.json", "tokenizer"}
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    assert (
        "library_name: transformers" in front and "pipeline_tag: text-generation" in front and "license: mit" in front
    )
    for needed in (
        "recipes.txt",
        "parameters",
        "perplexity",
        "bits per byte",
        "trained from scratch",
        "## A sample",
        "Muon (peak learning rate 0.02) for the block matrices",
        "moving average of the trained ones (decay 0.995)",
    ):
        assert needed in card, needed  # the optimizer the run used (the card used to say AdamW whatever it was)
    if (run / "loss.png").is_file():
        assert "loss.png" in names and "](loss.png)" in card


def test_exported_folder_opens_in_transformers(run, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = export_model(run, tmp_path / "out")
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert model.config.n_positions == tok.model_max_length == 32


def test_export_of_best_finds_the_run_records(run, tmp_path):
    out = export_model(run / "best", tmp_path / "best")
    assert "perplexity" in (out / "README.md").read_text()


def test_export_of_a_stopped_runs_best_and_checkpoint(run, tmp_path):
    import shutil

    stopped = tmp_path / "stopped"
    shutil.copytree(run, stopped)
    for name in ("config.json", "model.safetensors"):  # a run stopped before its final model
        (stopped / name).unlink()
    best_step = json.loads((stopped / "best" / "best_validation.json").read_text())["step"]
    card = (export_model(stopped / "best", tmp_path / "b") / "README.md").read_text()  # used to need RUN/config.json
    assert f"- Steps: {best_step:,} " in card
    last = sorted((stopped / "checkpoints").iterdir())[-1]
    card = (export_model(last, tmp_path / "c") / "README.md").read_text()
    assert f"- Steps: {int(last.name.split('-')[1]):,} " in card


def test_export_refuses_what_would_lose_or_leak(run, tmp_path):
    with pytest.raises(NotFoundError, match="no model here"):
        export_model(tmp_path, tmp_path / "x")
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text("{}")
    with pytest.raises(NotFoundError, match="a LoRA adapter, not a model; merge it"):
        export_model(tmp_path / "lora", tmp_path / "x")
    with pytest.raises(RunFolderError, match="inside the run"):
        export_model(run, run / "export")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep me")
    with pytest.raises(RunFolderError, match="not empty"):
        export_model(run, tmp_path / "full")
    assert (tmp_path / "full" / "mine.txt").read_text() == "keep me"


def test_export_command(run, tmp_path, capsys):
    assert main(["export", str(run), str(tmp_path / "out"), "--license", "apache-2.0"]) == 0
    assert "hf upload" in capsys.readouterr().out
    assert "license: apache-2.0" in (tmp_path / "out" / "README.md").read_text()
    assert main(["export", str(tmp_path), str(tmp_path / "o2")]) == 2


def test_card_of_a_fine_tune_names_its_base(run, tmp_path):
    given = json.loads((run / "run_config.json").read_text())
    given["options"]["init"] = "gpt2"
    (tmp_path / "run_config.json").write_text(json.dumps(given))
    for name in ("config.json", "metrics.jsonl"):
        (tmp_path / name).write_bytes((run / name).read_bytes())
    card = model_card(tmp_path)
    assert "base_model: gpt2" in card and "fine-tuned from `gpt2`" in card
