"""`gptforge demo`: the whole journey on the standard library's own source, with a tiny time budget."""

from __future__ import annotations

import re
import sysconfig
from pathlib import Path

import pytest

import gptforge.demo
from gptforge import load_model, load_tokenizer
from gptforge.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def test_stdlib_files_are_the_interpreters_own_source():
    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    files = gptforge.demo.stdlib_files(max_bytes=300_000)
    assert files and all(f.suffix == ".py" and f.is_file() for f in files)
    assert all(f.resolve().is_relative_to(root) for f in files)
    parts = {part for f in files for part in f.relative_to(root).parts}
    assert not parts & {"site-packages", "dist-packages", "test", "tests", "encodings"}
    assert sum(f.stat().st_size for f in files) <= 300_000
    assert files == sorted(files)  # the same corpus on every run
    names = {f.name for f in gptforge.demo.stdlib_files()}
    assert {"argparse.py", "abc.py"} <= names


def test_demo_runs_end_to_end_on_a_tiny_budget(tmp_path, monkeypatch, capsys):
    small = gptforge.demo.stdlib_files(max_bytes=80_000)  # real standard-library files, few enough to be quick
    monkeypatch.setattr(gptforge.demo, "stdlib_files", lambda: small)
    out = tmp_path / "demo-model"
    assert main(["demo", "--minutes", "0.05", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for stage in ("[1/4]", "[2/4]", "[3/4]", "[4/4]"):
        assert stage in printed
    assert f"{len(small)} files of the Python standard library" in printed
    assert re.search(r"perplexity [\d.]+, [\d.]+ bits per byte", printed)
    model, tok = load_model(out), load_tokenizer(out)
    assert model.config.vocab_size >= tok.vocab_size
    assert main(["generate", str(out), "--prompt", "def ", "--max-new-tokens", "5", "--seed", "0", "--no-stream"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    transformers = pytest.importorskip("transformers")
    transformers.AutoModelForCausalLM.from_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(out)


def test_demo_takes_your_own_text(tmp_path, capsys, sample_text):
    (tmp_path / "mine.txt").write_text(sample_text * 3, encoding="utf-8")
    out = tmp_path / "mine-model"
    assert main(["demo", str(tmp_path / "mine.txt"), "--minutes", "0.02", "--out", str(out), "--prompt", "The"]) == 0
    printed = capsys.readouterr().out
    assert "mine.txt" in printed and "standard library" not in printed.split("[2/4]")[0]
    assert (out / "model.safetensors").is_file()
    # a second run into the same folder is refused at once, before the tokenizer is trained again
    stamp = (out / "tokenizer" / "tokenizer.json").stat().st_mtime_ns
    assert main(["demo", str(tmp_path / "mine.txt"), "--minutes", "0.02", "--out", str(out)]) == 2
    assert "holds another run" in capsys.readouterr().err
    assert (out / "tokenizer" / "tokenizer.json").stat().st_mtime_ns == stamp
    # the message says to pass --resume, which the demo takes (it used to be "unrecognized arguments")
    assert main(["demo", str(tmp_path / "mine.txt"), "--minutes", "0.02", "--out", str(out), "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
