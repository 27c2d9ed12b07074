"""The gptforge command skeleton: --version, --help, info, create, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import gptforge
from gptforge import load_model
from gptforge.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"gptforge {gptforge.__version__}"


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: gptforge" in out and "info" in out and "create" in out


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage: gptforge" in capsys.readouterr().out


def test_info_on_a_preset(capsys):
    assert main(["info", "gpt2"]) == 0
    out = capsys.readouterr().out
    assert "124,439,808" in out and "124.4M" in out
    assert "n_embd=768" in out and "n_layer=12" in out and "n_head=12" in out and "vocab_size=50257" in out


def test_info_on_a_transformers_folder(capsys, hf_gpt2_dir):
    assert main(["info", str(hf_gpt2_dir)]) == 0
    out = capsys.readouterr().out
    model = load_model(hf_gpt2_dir)
    assert f"{model.num_params():,}" in out
    assert "vocab_size=300" in out and "n_positions=64" in out and "n_head=4" in out
    size = (hf_gpt2_dir / "model.safetensors").stat().st_size
    assert "model.safetensors" in out and f"{size:,}" in out and "config.json" in out


def test_info_on_a_weights_file_shows_its_folder(capsys, hf_gpt2_dir):
    assert main(["info", str(hf_gpt2_dir / "model.safetensors")]) == 0
    assert f"model: {hf_gpt2_dir}" in capsys.readouterr().out


def test_create_then_info_then_load(tmp_path, capsys):
    out = tmp_path / "model"
    assert main(["create", "tiny", "--out", str(out), "--n-layer", "2", "--vocab-size", "500", "--seed", "3"]) == 0
    assert "tiny" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "generation_config.json"} <= {p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["n_layer"], cfg["vocab_size"], cfg["n_embd"]) == (2, 500, 128)
    model = load_model(out)
    assert main(["info", str(out)]) == 0
    assert f"{model.num_params():,}" in capsys.readouterr().out

    # The seed decides the weights.
    assert (
        main(
            ["create", "tiny", "--out", str(tmp_path / "again"), "--n-layer", "2", "--vocab-size", "500", "--seed", "3"]
        )
        == 0
    )
    again = load_model(tmp_path / "again")
    assert all((a == b).all() for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_create_does_not_overwrite_without_force(tmp_path, capsys):
    out = tmp_path / "model"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["create", "tiny", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert (out / "notes.txt").read_text() == "mine" and not (out / "config.json").exists()
    assert main(["create", "tiny", "--out", str(out), "--force"]) == 0
    assert (out / "config.json").is_file()


@pytest.mark.parametrize(
    "argv,words",
    [
        (["create", "tiny", "--n-head", "3"], ["n_embd=128", "n_head=3"]),
        (["create", "tiny", "--n-layer", "0"], ["n_layer", "0"]),
        (["create", "gpt5"], ["gpt5", "tiny"]),
    ],
)
def test_create_with_a_bad_config(tmp_path, capsys, argv, words):
    out = tmp_path / "m"
    assert main(argv + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("gptforge create: error:")
    for word in words:
        assert word in err
    assert not out.exists()


def test_info_on_a_missing_path_is_a_one_line_error(tmp_path, capsys):
    missing = tmp_path / "no" / "such"
    assert main(["info", str(missing)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("gptforge info: error:") and str(missing) in err


def test_info_on_a_folder_without_config(tmp_path, capsys):
    assert main(["info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(tmp_path) in err and "config.json" in err


@pytest.mark.slow
def test_console_script(tmp_path):
    """The installed `gptforge` entry point runs and reports errors with exit code 2."""
    exe = Path(sys.executable).with_name("gptforge")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "gptforge"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ok = subprocess.run(cmd + ["info", "tiny"], capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0 and "n_embd=128" in ok.stdout
    bad = subprocess.run(
        cmd + ["info", str(tmp_path / "missing")], capture_output=True, text=True, env=env, timeout=120
    )
    assert bad.returncode == 2 and "missing" in bad.stderr and "Traceback" not in bad.stderr
