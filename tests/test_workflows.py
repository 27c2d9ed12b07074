"""The two classic GPT-2 workflows end to end: a new model from scratch in Python (GPTForge), and fine-tuning
a pretrained GPT-2 folder on the command line (train -> eval -> generate)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptforge import (
    GPTForge,
    GPTForgeError,
    TokenDataset,
    build_gpt2_config,
    load_model,
    load_tokenizer,
    train_tokenizer,
)
from gptforge.cli import main

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def _write_corpus(path: Path, lines: int, seed: int = 0) -> Path:
    import random

    rng = random.Random(seed)
    words = (
        "the cat sat on a mat while dogs ran to old red barns and fish swim in blue water "
        "under seven bright stars the keeper of the lighthouse wrote long letters"
    ).split()
    text = "\n".join(
        " ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize() + "." for _ in range(lines)
    )
    path.write_text(text + "\n", encoding="utf-8")
    return path


# --- workflow 1: a new model from scratch, in Python ------------------------------------------------------


RELOAD = """
import json, sys
from gptforge import GPTForge
first = GPTForge(model="trained_model/pytorch_model.bin", vocab_file="vocab.json", merges_file="merges.txt",
                 config="trained_model/config.json")
second = GPTForge("trained_model")
kw = dict(n=2, prompt="The cat", max_length=24, temperature=0.9, top_p=0.95, seed=11, return_as_list=True)
print(json.dumps([first.generate(**kw), second.generate(**kw)]))
"""


@pytest.mark.slow
def test_workflow_scratch_train_reload_in_new_process(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write_corpus(tmp_path / "input.txt", 300)
    tok = train_tokenizer("input.txt", vocab_size=300)  # vocab.json, merges.txt, tokenizer.json in the current folder
    assert {"vocab.json", "merges.txt", "tokenizer.json"} <= {p.name for p in tmp_path.iterdir()}
    data = TokenDataset(
        "input.txt", vocab_file="vocab.json", merges_file="merges.txt", block_size=32, cache_dir=tmp_path / "cache"
    )
    config = build_gpt2_config(vocab_size=tok.vocab_size, max_length=32, dropout=0.0, n_embd=32, n_layer=2, n_head=2)
    ai = GPTForge(vocab_file="vocab.json", merges_file="merges.txt", config=config)
    assert not ai.pretrained and ai.config.vocab_size == tok.vocab_size
    before = ai.evaluate("input.txt").loss

    result = ai.train(
        data, batch_size=8, num_steps=12, learning_rate=3e-3, progress=False, plot=False, save_minutes=None
    )

    assert result.step == 12 and not result.interrupted
    assert ai.evaluate("input.txt").loss < before  # it learned something
    folder = tmp_path / "trained_model"
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.json", "merges.txt"} <= {
        p.name for p in folder.iterdir()
    }
    assert not (folder / "pytorch_model.bin").exists()  # the legacy name still works when reloading (below)
    kw = dict(n=2, prompt="The cat", max_length=24, temperature=0.9, top_p=0.95, seed=11, return_as_list=True)
    texts = ai.generate(**kw)
    assert len(texts) == 2 and all(t.startswith("The cat") for t in texts)
    assert texts == ai.generate(**kw)  # the seed decides

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", RELOAD], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env
    )
    assert out.returncode == 0, out.stderr
    first, second = json.loads(out.stdout.strip().splitlines()[-1])
    assert first == texts and second == texts


def test_generate_prints_or_returns_and_counts_prompt_in_max_length(tmp_path, capsys):
    _write_corpus(tmp_path / "t.txt", 80)
    tok = train_tokenizer(tmp_path / "t.txt", vocab_size=280, out_dir=tmp_path / "tok")
    config = build_gpt2_config(vocab_size=tok.vocab_size, max_length=32, n_embd=16, n_layer=1, n_head=2)
    ai = GPTForge(config=config, tokenizer_file=tmp_path / "tok" / "tokenizer.json")
    assert ai.generate(n=3, prompt="The", max_length=10, seed=1) is None
    printed = capsys.readouterr().out
    assert printed.count("=" * 10) == 2 and printed.startswith("The")
    texts = ai.generate(n=1, prompt="The cat", max_length=12, temperature=0.0, return_as_list=True)
    ids = tok.encode(texts[0])
    assert len(tok.encode("The cat")) < len(ids) <= 12 + 1  # decoding may merge one token differently
    with pytest.raises(GPTForgeError, match="max_length=2 leaves no room"):
        ai.generate(prompt="The cat sat on", max_length=2)
    path = ai.generate_to_file(n=2, destination_path=tmp_path / "s.txt", seed=5, max_length=8)
    assert path.read_text(encoding="utf-8").count("=" * 20) == 2
    with pytest.raises(GPTForgeError, match="already exists"):
        ai.generate_to_file(n=1, destination_path=path)


def test_mismatches_name_both_numbers(tmp_path):
    _write_corpus(tmp_path / "t.txt", 120)
    tok = train_tokenizer(tmp_path / "t.txt", vocab_size=290, out_dir=tmp_path / "tok")
    vocab, merges = tmp_path / "tok" / "vocab.json", tmp_path / "tok" / "merges.txt"
    with pytest.raises(GPTForgeError, match=rf"has {tok.vocab_size} tokens but the config has vocab_size=5000"):
        GPTForge(vocab_file=vocab, merges_file=merges, config=build_gpt2_config(vocab_size=5000, max_length=16))
    config = build_gpt2_config(vocab_size=tok.vocab_size, max_length=16, n_embd=16, n_layer=1, n_head=2)
    ai = GPTForge(vocab_file=vocab, merges_file=merges, config=config)
    data = TokenDataset(tmp_path / "t.txt", tokenizer=tok, block_size=24, cache_dir=tmp_path / "cache")
    with pytest.raises(GPTForgeError, match="block_size is 24 but the config's max_length .n_positions. is 16"):
        ai.train(data, num_steps=1, output_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(GPTForgeError, match="unknown option.*num_step\\b"):
        ai.train(data, num_step=1)
    with pytest.raises(GPTForgeError, match="needs model="):
        GPTForge()
    with pytest.raises(GPTForgeError, match="needs its tokenizer"):
        GPTForge(config=config)
    ai.save(tmp_path / "m")
    with pytest.raises(GPTForgeError, match="already holds a model"):
        ai.save(tmp_path / "m")


# --- workflow 2: fine-tune a pretrained GPT-2 on the command line ---------------------------------------------


@pytest.fixture
def pretrained(tmp_path, hf_gpt2_dir, sample_text):
    """The transformers GPT-2 folder (vocab 300) with a gptforge tokenizer of the same size saved into it."""
    folder = tmp_path / "pretrained"
    shutil.copytree(hf_gpt2_dir, folder)
    (tmp_path / "tok.txt").write_text(sample_text, encoding="utf-8")
    tok = train_tokenizer(tmp_path / "tok.txt", vocab_size=300, out_dir=folder)
    assert tok.vocab_size == 300
    return folder


def test_workflow_finetune_on_the_command_line(tmp_path, pretrained, capsys):
    train_file = _write_corpus(tmp_path / "train.txt", 24, seed=1)
    val_file = _write_corpus(tmp_path / "val.txt", 15, seed=2)
    out = tmp_path / "output"
    rc = main(
        [
            "train",
            "--init",
            str(pretrained),
            "--train-file",
            str(train_file),
            "--eval-file",
            str(val_file),
            "--block-size",
            "32",
            "--batch-size",
            "1",
            "--grad-accum",
            "4",
            "--save-steps",
            "2",
            "--epochs",
            "1",
            "--out",
            str(out),
            "--no-progress",
            "--no-plot",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "fine-tuning" in printed and re.search(r"validation: loss [\d.]+, perplexity [\d.]+", printed)
    steps = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    saved = sorted(int(p.name.removeprefix("step-")) for p in (out / "checkpoints").glob("step-*"))
    # one every --save-steps and one at the end; the 3 most recent are kept
    assert steps >= 3 and saved == sorted(set(range(2, steps, 2)) | {steps})[-3:]
    assert (out / "checkpoints" / f"step-{saved[0]:07d}" / "model.safetensors").is_file()
    meta = json.loads((out / "data" / "meta.json").read_text())
    assert meta["val"]["tokens"] > 0 and meta["val_inputs"]  # the --eval-file is the validation split
    before, after = load_model(pretrained), load_model(out)
    assert not torch.equal(before.transformer.h[0].attn.c_attn.weight, after.transformer.h[0].attn.c_attn.weight)

    assert main(["eval", str(out), str(val_file)]) == 0
    line = capsys.readouterr().out
    ppl = float(re.search(r"perplexity ([\d.]+)", line).group(1))
    assert ppl == pytest.approx(GPTForge(str(out)).evaluate(str(val_file)).perplexity, rel=1e-3)

    options = [
        "--max-new-tokens",
        "20",
        "--temperature",
        "0.8",
        "--top-k",
        "40",
        "--top-p",
        "0.9",
        "--repetition-penalty",
        "1.2",
        "--seed",
        "42",
    ]
    assert main(["generate", str(out), "--prompt", "The old lighthouse keeper", *options, "--no-stream"]) == 0
    cli_text = capsys.readouterr().out.rstrip("\n")
    api_text = GPTForge(str(out)).generate(
        prompt="The old lighthouse keeper",
        max_new_tokens=20,
        temperature=0.8,
        top_k=40,
        top_p=0.9,
        repetition_penalty=1.2,
        seed=42,
        return_as_list=True,
    )[0]
    assert cli_text == api_text and cli_text.startswith("The old lighthouse keeper")

    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([load_tokenizer(out).encode("The old lighthouse")])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, after(ids)[0], atol=1e-4, rtol=1e-4)


def test_single_train_file_gets_a_90_10_split(tmp_path, pretrained, capsys):
    train_file = tmp_path / "book.txt"
    train_file.write_text("\n\n".join(_write_corpus(tmp_path / "p.txt", 4, seed=i).read_text() for i in range(40)))
    rc = main(
        [
            "train",
            "--init",
            str(pretrained),
            "--train-file",
            str(train_file),
            "--block-size",
            "16",
            "--max-steps",
            "1",
            "--batch-size",
            "2",
            "--out",
            str(tmp_path / "o"),
            "--no-progress",
            "--no-plot",
        ]
    )
    assert rc == 0
    meta = json.loads((tmp_path / "o" / "data" / "meta.json").read_text())
    share = meta["val"]["documents"] / (meta["val"]["documents"] + meta["train"]["documents"])
    assert meta["val"]["tokens"] > 0 and 0.02 < share < 0.3 and not meta["val_inputs"]


# --- the README's command-line reference ------------------------------------------------------------------------


def test_readme_cli_reference_is_up_to_date():
    """docs/cli.md's tables are generated from the parsers; a new or changed command or option must be regenerated."""
    import runpy

    script = runpy.run_path(str(ROOT / "docs" / "cli_reference.py"))
    assert script["main"](["--check", str(ROOT / "docs" / "cli.md")]) == 0, (
        "docs/cli.md is out of date: run `python docs/cli_reference.py --write docs/cli.md`"
    )
    block = script["reference"]()
    for option in ("`--grad-accum`", "`--max-new-tokens`", "`--minutes`", "`--val-fraction`"):
        assert option in block
    for command in ("gptforge tokenizer train", "gptforge prepare", "gptforge train", "gptforge generate"):
        assert f"## `{command}`" in block


def test_training_failure_is_one_line_on_the_command_line(tmp_path, monkeypatch, capsys):
    """Out of memory or a diverged loss (TrainingError) reaches the user as the message, not a traceback."""
    import gptforge.train.pipeline
    from gptforge.errors import TrainingError

    def fail(*args, **kwargs):
        raise TrainingError("out of memory at step 3 (batch 16 x 1024). Lower --batch-size")

    monkeypatch.setattr(gptforge.train.pipeline, "run_training", fail)
    assert main(["train", str(_write_corpus(tmp_path / "t.txt", 5)), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "gptforge train: error: out of memory at step 3 (batch 16 x 1024). Lower --batch-size"


def test_python_finetune_of_a_pretrained_folder(tmp_path, pretrained, monkeypatch):
    """GPTForge(folder).train(text files, block_size=...) fine-tunes with the fine-tuning defaults."""
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path / "cache"))  # where TokenDataset keeps encoded text
    ai = GPTForge(str(pretrained))
    assert ai.pretrained and ai.tokenizer.vocab_size == ai.config.vocab_size == 300
    book = _write_corpus(tmp_path / "book.txt", 40)
    result = ai.train(
        str(book),
        num_steps=2,
        batch_size=2,
        block_size=16,
        output_dir=tmp_path / "ft",
        progress=False,
        plot=False,
        save_minutes=None,
    )
    assert result.step == 2
    rows = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["lr"] for r in rows if "lr" in r) <= 5e-5  # not the from-scratch 1e-3
    assert list((tmp_path / "cache").glob("datasets/*/meta.json"))
    with pytest.raises(GPTForgeError, match="block_size is 128 but the model's context .n_positions. is only 64"):
        ai.train(str(book), num_steps=1, block_size=128, output_dir=tmp_path / "ft2")
    assert GPTForge(str(tmp_path / "ft")).generate(
        prompt="The", max_new_tokens=5, seed=0, return_as_list=True
    ) == ai.generate(prompt="The", max_new_tokens=5, seed=0, return_as_list=True)
