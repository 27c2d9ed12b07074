"""Model files, export, options and kills, third round (issue 39): what a run folder, an adapter folder, a
config.json or a --config file may hold, and what the user gets. Each test is a row of docs/reliability.md."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


# --- 7: prepare's workers end with their parent ----------------------------------------------------------


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _running(pid: int) -> bool:
    """Whether `pid` is a process that has not ended (a zombie has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the process tree from /proc")
def test_prepare_workers_end_when_prepare_is_killed(tmp_path, sample_text):
    from gptforge.data.vocabulary import train_tokenizer

    train_tokenizer([], vocab_size=300, texts=[sample_text], out_dir=tmp_path / "tok")
    big = tmp_path / "big.txt"
    big.write_text((sample_text + "\n\n") * (16_000_000 // len(sample_text)), encoding="utf-8")
    script = (
        f"from gptforge.data import prepare\n"
        f"prepare([{str(big)!r}], {str(tmp_path / 'tok')!r}, {str(tmp_path / 'data')!r}, workers=2)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    workers: list[int] = []
    while proc.poll() is None and len(workers) < 2:
        workers = _children(proc.pid)
    assert len(workers) == 2, "prepare ended before its workers could be seen"
    proc.kill()  # kill -9: no clean-up runs in the parent
    proc.wait()
    eof = threading.Thread(target=proc.stdout.read, daemon=True)  # ends once no worker holds the output
    eof.start()
    eof.join(60)
    alive = workers
    for _ in range(100):  # a worker that has closed its output may take a moment more to be gone
        alive = [w for w in alive if _running(w)]
        if not alive:
            break
        time.sleep(0.1)
    for w in alive:  # never leave them behind, whatever the result
        os.kill(w, signal.SIGKILL)
    assert not eof.is_alive() and not alive, f"workers {alive} outlived their killed parent, holding its output"


# --- 20, 22: only gptforge's own leftovers are cleaned, also beside a reused dataset -----------------------


def _names_gptforge_makes(folder: Path) -> tuple[str, str]:
    """(the temporary name of a file write, the temporary folder name of a folder write) in `folder`, as a write
    cut short by a kill leaves them."""
    from gptforge.fsio import atomic_dir, atomic_write

    seen = []
    atomic_write(folder / "model.safetensors", lambda p: (seen.append(p.name), p.write_bytes(b"x")))
    with atomic_dir(folder / "step-0000001") as tmp:
        seen.append(tmp.name)
    return seen[0], seen[1]


def test_only_files_gptforge_wrote_are_cleaned_at_the_next_start(tmp_path):
    from gptforge.train.runfolder import claim_run_folder

    run = tmp_path / "run"
    run.mkdir()
    tmp_file, tmp_dir = _names_gptforge_makes(run)
    (run / tmp_file).write_bytes(b"half")  # left by a killed save
    (run / tmp_dir).mkdir()
    (run / ".notes.tmp-draft").write_text("my notes")  # the user's own hidden files
    (run / ".env.old-config").write_text("KEY=1")
    (run / ".backup.old-2024").mkdir()
    said = []
    with claim_run_folder(run, said.append):
        pass
    assert not (run / tmp_file).exists() and not (run / tmp_dir).exists()
    assert (run / ".notes.tmp-draft").read_text() == "my notes"  # was deleted
    assert (run / ".env.old-config").read_text() == "KEY=1" and not (run / "env").exists()  # was renamed to env
    assert (run / ".backup.old-2024").is_dir() and not (run / "backup").exists()
    assert not any(".notes" in m or ".env" in m or ".backup" in m for m in said)


def test_a_reused_dataset_clears_a_killed_prepares_temporary_folder(tmp_path, corpus):
    from gptforge.data import prepare
    from gptforge.data.vocabulary import train_tokenizer
    from gptforge.fsio import atomic_dir

    tok = train_tokenizer([str(corpus)], vocab_size=300, out_dir=None)
    first = prepare([str(corpus)], tok, tmp_path / "data")
    gone = subprocess.Popen(["true"])  # a process that has ended: its pid names no live process
    gone.wait()
    with atomic_dir(tmp_path / "data-probe") as probe:  # the name a prepare of pid N gives its temporary folder
        stale_name = probe.name.replace(".data-probe.", ".data.").replace(f"-{os.getpid()}-", f"-{gone.pid}-")
    (tmp_path / stale_name).mkdir()
    (tmp_path / stale_name / "train_0000.bin").write_bytes(b"\0" * 1000)
    again = prepare([str(corpus)], tok, tmp_path / "data")
    assert again["reused"] and again["fingerprint"] == first["fingerprint"]
    assert not (tmp_path / stale_name).exists()  # was left behind whenever the data were reused


def test_predicting_from_a_table_needs_no_label_column(tmp_path):
    from gptforge.data.labelled import read_labelled

    (tmp_path / "x.csv").write_text("text,source\nfirst text,web\nsecond text,mail\n", encoding="utf-8")
    (tmp_path / "y.tsv").write_text("one\ntwo\n", encoding="utf-8")
    assert read_labelled(tmp_path / "x.csv", need_labels=False).texts == ["first text", "second text"]
    assert read_labelled(tmp_path / "y.tsv", 0, header=False, need_labels=False).texts == ["one", "two"]
    with pytest.raises(Exception, match="no column 'label'"):  # training still needs its labels
        read_labelled(tmp_path / "x.csv")


# --- 5, 12, 17: adapter_config.json checked field by field -------------------------------------------------


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """(a tiny base model folder, an adapter folder of it) made by gptforge."""
    import torch

    from gptforge.adapters import apply_lora, save_adapter
    from gptforge.checkpoint import load_model, save_model
    from gptforge.config import GPTConfig
    from gptforge.model import GPT

    root = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=300, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    save_model(GPT(config), root / "base")
    model = load_model(root / "base")
    apply_lora(model, 4, 8.0, base=root / "base")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # an adapter that changes something
    save_adapter(model, root / "lora")
    return root / "base", root / "lora"


def _merged(base: Path, folder: Path):
    """The base model of `base` with the adapter of `folder` folded in."""
    from gptforge.adapters import load_adapter, merge_lora
    from gptforge.checkpoint import load_model

    model = load_model(base)
    load_adapter(model, folder)
    return merge_lora(model)


def _edited_adapter(adapter, tmp_path, **fields) -> Path:
    import json
    import shutil

    folder = tmp_path / "lora"
    shutil.copytree(adapter[1], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(fields)
    (folder / "adapter_config.json").write_text(json.dumps(config))  # allow_nan: NaN and Infinity as Python writes them
    return folder


@contextlib.contextmanager
def _deadline(seconds: int):
    """Fail (instead of hanging the test run) when the block takes longer than `seconds`."""

    def stop(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


BAD_ADAPTER_FIELDS = [
    ({"r": "eight"}, r"r 'eight': must be an integer above 0"),
    ({"r": 0}, r"r 0: must be an integer above 0"),  # was "--lora-r 0", a flag never given
    ({"lora_alpha": None}, r"lora_alpha None: must be a finite number"),
    ({"lora_alpha": "x"}, r"lora_alpha 'x': must be a finite number"),
    ({"lora_alpha": float("nan")}, r"lora_alpha nan: must be a finite number"),  # merged weights were NaN
    ({"lora_alpha": 1e308}, r"lora_alpha 1e\+308: must be a finite number no larger than 65536"),  # were inf
    ({"lora_dropout": "lots"}, r"lora_dropout 'lots': must be a number from 0 to below 1"),
    ({"alpha_pattern": {"[unclosed": 4}}, r"alpha_pattern key '\[unclosed': gptforge takes plain layer names"),
    ({"alpha_pattern": {"(.*)*(.*)*(.*)*(.*)*(.*)*zzz": 4}}, r"alpha_pattern key .*not regular expressions"),  # hung
    ({"alpha_pattern": {"h.0.attn.c_attn": float("inf")}}, r"alpha_pattern\['h.0.attn.c_attn'\] inf"),
    ({"rank_pattern": []}, r"rank_pattern \[\]: must be an object"),
]


@pytest.mark.parametrize(
    "fields, message", BAD_ADAPTER_FIELDS, ids=[next(iter(f)) + str(i) for i, (f, _) in enumerate(BAD_ADAPTER_FIELDS)]
)
def test_adapter_config_fields_are_checked_and_named(adapter, tmp_path, fields, message):
    from gptforge.errors import CheckpointError

    folder = _edited_adapter(adapter, tmp_path, **fields)
    with (
        _deadline(20),
        pytest.raises(
            CheckpointError,
            match=rf"^{re.escape(str(folder / 'adapter_config.json'))}: "
            rf"{message}",
        ),
    ):
        _merged(adapter[0], folder)


def test_plain_layer_names_in_alpha_pattern_still_apply(adapter, tmp_path):
    import torch

    plain = _merged(adapter[0], adapter[1])
    doubled = _merged(adapter[0], _edited_adapter(adapter, tmp_path, alpha_pattern={"h.1.mlp.c_fc": 16}))
    weights = dict(plain.named_parameters())
    changed = [n for n, p in doubled.named_parameters() if not torch.equal(p, weights[n])]
    assert changed == ["transformer.h.1.mlp.c_fc.weight"]


def test_an_adapter_with_nan_weights_is_refused(adapter, tmp_path):
    from safetensors.torch import load_file, save_file

    from gptforge.errors import CheckpointError

    folder = _edited_adapter(adapter, tmp_path)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    key = min(tensors)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match=f"{re.escape(key)} holds NaN or infinite values"):
        _merged(adapter[0], folder)


# --- 6: config.json compared with the weights before the model is built -------------------------------------


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "int8"])
def test_a_config_of_a_million_layers_beside_small_weights_is_refused_at_once(adapter, tmp_path, quantized):
    import json
    import shutil

    from gptforge.checkpoint import load_model, quantize_folder
    from gptforge.errors import CheckpointError

    folder = tmp_path / "model"
    if quantized:
        quantize_folder(adapter[0], folder)
    else:
        shutil.copytree(adapter[0], folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(n_layer=1_000_000, n_embd=4096, n_head=32)
    (folder / "config.json").write_text(json.dumps(config))
    with (
        _deadline(30),
        pytest.raises(CheckpointError, match="the weights hold 2 blocks but config.json says n_layer=1000000"),
    ):
        load_model(folder)  # built a million blocks first (minutes)
    config.update(n_layer=2)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="shape|do not match the config"):  # then n_embd: which numbers differ
        load_model(folder)


# --- 16, 21: options refused before any work, under their own flags --------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--beta1", "1"], "--beta1 1.0: must be a number at least 0 and below 1"),  # was torch's ValueError mid-start
        (["--beta2", "1"], "--beta2 1.0: must be a number at least 0 and below 1"),
        (
            ["--sample-tokens", "100000000"],
            "--sample-tokens 100000000: must be an integer at least 0 and at most 1048576",
        ),
        (["--lora-r", "8", "--lora-alpha", "1e308"], "--lora-alpha 1e+308: must be a number above 0 and at most 65536"),
    ],
)
def test_options_torch_or_sampling_would_refuse_are_refused_first(tmp_path, corpus, capsys, argv, message):
    from gptforge.cli import main

    out = tmp_path / "run"
    code = main(["train", str(corpus), "--out", str(out), "--size", "tiny", "--max-steps", "1", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "max_new_tokens" not in err and "Traceback" not in err
    assert not out.exists()  # nothing prepared or trained first


# --- 19: a --config file that cannot be read is one line naming the file and the key -----------------------


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("run.yaml", b"lr: [1, 2\nmax-steps: 3\n", "line 2: not valid YAML"),  # were tracebacks
        ("run.yaml", b"sample-prompt: caf\xe9\n", "not UTF-8 text (byte 0xe9 at offset 18); save it as UTF-8"),
        ("run.yaml", b"max-time: .nan\n", "--max-time nan: not a number an option can take"),
        ("run.yaml", b"max-time: ten\n", "--max-time 'ten': expected a duration"),
        ("run.json", b'{"lr": NaN}', "--lr nan: not a number an option can take"),
        ("run.json", b'{"lr": 0.1,}', "cannot be parsed"),
    ],
)
def test_a_config_file_that_cannot_be_read_is_one_line(tmp_path, corpus, capsys, name, content, message):
    from gptforge.cli import main

    config = tmp_path / name
    config.write_bytes(content)
    code = main(["train", str(corpus), "--out", str(tmp_path / "run"), "--config", str(config)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("gptforge train: error: ") and f"--config {config}: {message}" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "run").exists()


# --- 11: every training task gives the same weights for the same seed --------------------------------------


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory, sample_text):
    """A tiny language-model folder with its tokenizer (vocab 300)."""
    import torch

    from gptforge.checkpoint import save_model
    from gptforge.config import GPTConfig
    from gptforge.data.vocabulary import train_tokenizer
    from gptforge.model import GPT

    tok = train_tokenizer([], vocab_size=300, texts=[sample_text + "\n### User:\n### Assistant:\n"], out_dir=None)
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=300, n_positions=64, n_embd=32, n_layer=1, n_head=2, bos_token_id=tok.eos_id, eos_token_id=tok.eos_id
    )
    return save_model(GPT(config), tmp_path_factory.mktemp("lm"), tok)


def _rows(path: Path, rows: list[dict]) -> str:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _train_task(task: str, out: Path, data: Path, lm: Path, corpus: Path) -> Path:
    """Train `task` for two steps into `out` with seed 7; the folder of its final model."""
    import torch

    from gptforge.train.classification import train_classifier
    from gptforge.train.pipeline import run_training

    torch.manual_seed(len(str(out)))  # whatever the process drew before must not matter
    quick = {
        "out_dir": str(out),
        "seed": 7,
        "max_steps": 2,
        "batch_size": 4,
        "progress": False,
        "plot": False,
        "save_minutes": None,
        "eval_interval": 0,
        "log": lambda m: None,
    }
    if task == "classification":
        words = ["ball goal team", "bread soup cheese"]
        train_classifier(
            _rows(data / "labels.jsonl", [{"text": f"{words[i % 2]} {i}", "label": f"c{i % 2}"} for i in range(24)]),
            init=str(lm),
            **quick,
        )
    elif task == "instructions":
        run_training(
            [_rows(data / "chat.jsonl", [{"prompt": f"Say {i}: ", "completion": f"{i}!"} for i in range(24)])],
            init=str(lm),
            sample_interval=0,
            **quick,
        )
    else:
        run_training(
            [str(corpus)],
            size="tiny",
            vocab_size=300,
            block_size=16,
            sample_interval=0,
            model_overrides={"n_layer": 1, "n_embd": 32, "n_head": 2},
            **quick,
        )
    return out


@pytest.mark.parametrize("task", ["language_modelling", "classification", "instructions"])
def test_each_training_task_gives_the_same_weights_for_the_same_seed(tmp_path, lm_folder, corpus, task, one_thread):
    from safetensors.torch import load_file

    first = load_file(str(_train_task(task, tmp_path / "a", tmp_path, lm_folder, corpus) / "model.safetensors"))
    again = load_file(str(_train_task(task, tmp_path / "bb", tmp_path, lm_folder, corpus) / "model.safetensors"))
    assert sorted(first) == sorted(again)
    differ = [k for k in first if not first[k].equal(again[k])]
    assert not differ, f"{task}: {differ} differ between two runs with --seed 7"  # classification: the new head did


# --- 2, 18: export copies the run's own files only, and knows a classifier ---------------------------------


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, corpus):
    """A finished tiny language-model run with its records (metrics, samples, loss.png)."""
    from gptforge.train.pipeline import run_training

    out = tmp_path_factory.mktemp("runs") / "run"
    run_training(
        [str(corpus)],
        size="tiny",
        vocab_size=300,
        block_size=16,
        out_dir=str(out),
        max_steps=2,
        batch_size=2,
        model_overrides={"n_layer": 1, "n_embd": 32, "n_head": 2},
        progress=False,
        save_minutes=None,
        sample_tokens=4,
        eval_tokens=256,
        log=lambda m: None,
    )
    return out


@pytest.mark.parametrize("name", ["vocab.json", "generation_config.json", "loss.png", "best/config.json"])
def test_export_never_copies_what_a_run_links_to_outside_it(lm_run, tmp_path, name):
    import shutil

    from gptforge.errors import RunFolderError
    from gptforge.export import export_model

    run = tmp_path / "run"
    shutil.copytree(lm_run, run)
    secret = tmp_path / "id_rsa"
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    (run / name).unlink(missing_ok=True)
    (run / name).symlink_to(secret)  # ln -sf ~/.ssh/id_rsa RUN/vocab.json
    exported = run / "best" if name.startswith("best/") else run
    with pytest.raises(
        RunFolderError, match=rf"^{re.escape(str(run / name))}: a link to .*id_rsa, outside the run folder"
    ):
        export_model(exported, tmp_path / "out")  # exited 0, out/vocab.json holding the key
    assert not (tmp_path / "out").exists()


def test_export_follows_links_inside_the_run_and_keeps_outside_records_out_of_the_card(lm_run, tmp_path):
    import shutil

    from gptforge.export import export_model

    run = tmp_path / "run"
    shutil.copytree(lm_run, run)
    (run / "vocab.json").rename(run / "vocab.real.json")
    (run / "vocab.json").symlink_to("vocab.real.json")  # a link inside the run is the run's own file
    secret = tmp_path / "notes.txt"
    secret.write_text("=== step 1\nmy private diary\n")
    (run / "samples.txt").unlink()
    (run / "samples.txt").symlink_to(secret)
    out = export_model(run, tmp_path / "out")
    assert (out / "vocab.json").read_bytes() == (run / "vocab.real.json").read_bytes()
    assert "private diary" not in (out / "README.md").read_text()


def test_export_of_a_classifier_gets_a_classification_card(lm_folder, tmp_path):
    import yaml

    from gptforge.export import export_model
    from gptforge.train.classification import train_classifier

    words = ["ball goal team", "bread soup cheese"]
    data = _rows(
        tmp_path / "labels.jsonl",
        [{"text": f"{words[i % 2]} {i}", "label": ["sport", "food"][i % 2]} for i in range(24)],
    )
    train_classifier(
        data,
        init=str(lm_folder),
        out_dir=str(tmp_path / "clf"),
        max_steps=2,
        batch_size=4,
        progress=False,
        plot=False,
        save_minutes=None,
        log=lambda m: None,
    )
    out = export_model(tmp_path / "clf", tmp_path / "out")  # was KeyError: 'val_perplexity'
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["pipeline_tag"] == "text-classification" and "text-generation" not in card
    assert "2 labels: food, sport" in card and "held-out validation examples: accuracy" in card
