"""Never lose or corrupt a user's work: the run folder, resume, bad options and faults (issue 12).

Each test here is a row of docs/reliability.md: a bad input or a fault, and what the user gets.
"""

from __future__ import annotations

import _thread
import contextlib
import errno
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from gptforge.checkpoint import save_model
from gptforge.cli import main
from gptforge.config import GPTConfig
from gptforge.data.vocabulary import train_tokenizer
from gptforge.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    OptionError,
    RunFolderError,
    TokenizerError,
    TrainingError,
)
from gptforge.fsio import LOCK_NAME, atomic_write, clean_leftovers, exclusive_lock
from gptforge.model import GPT
from gptforge.train.pipeline import run_training
from gptforge.train.state import list_checkpoints, load_training_state, save_checkpoint

REPO = Path(__file__).resolve().parents[1]


# --- fixtures -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, sample_text) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "input.txt"
    path.write_text(sample_text * 2, encoding="utf-8")
    return path


def quick(out, **kw) -> dict:
    """Options of a run that takes a second: a few steps of a small batch, no plots, no bars."""
    opts = dict(
        out_dir=str(out),
        batch_size=2,
        block_size=16,
        log_interval=1,
        eval_interval=0,
        eval_tokens=256,
        sample_interval=0,
        sample_tokens=4,
        progress=False,
        plot=False,
        save_minutes=None,
        max_steps=2,
    )
    opts.update(kw)
    return opts


TINY = dict(size="tiny", model_overrides=dict(n_layer=1, n_embd=32, n_head=2), vocab_size=300)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, corpus) -> Path:
    """A from-scratch run on raw text with checkpoints at steps 1 and 2, made once and copied by the tests."""
    out = tmp_path_factory.mktemp("runs") / "run"
    run_training([str(corpus)], **TINY, log=lambda m: None, **quick(out, save_steps=1))
    assert [p.name for p in list_checkpoints(out)] == ["step-0000001", "step-0000002"]
    return out


@pytest.fixture
def run_copy(tmp_path, finished_run, corpus) -> tuple[Path, Path]:
    """(a copy of `finished_run`, a copy of its input text that the test may change)."""
    text = tmp_path / "input.txt"
    shutil.copy(corpus, text)
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out, text


def tiny_model_folder(folder: Path, n_positions: int = 32) -> Path:
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=300, n_positions=n_positions, n_embd=32, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0
    )
    save_model(GPT(config), folder)
    return folder


def cli(capsys, *argv: str) -> tuple[int, str]:
    """Exit code and stderr of `gptforge ARGV`."""
    code = main(list(map(str, argv)))
    return code, capsys.readouterr().err


# --- data loss and silent corruption --------------------------------------------------------------------


def test_out_with_unrelated_files_is_refused_and_untouched(tmp_path, corpus):
    out = tmp_path / "mine"
    (out / "best").mkdir(parents=True)
    (out / "best" / "results.csv").write_text("a,b\n")
    (out / "config.json").write_text("{}")
    (out / "loss.png").write_bytes(b"png")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    for overwrite in (False, True):
        with pytest.raises(RunFolderError, match="not a gptforge run .*best, config.json, loss.png"):
            run_training([str(corpus)], **TINY, **quick(out, overwrite=overwrite))
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_out_inside_init_is_refused(tmp_path, corpus):
    pre = tiny_model_folder(tmp_path / "pre")
    weights = (pre / "model.safetensors").read_bytes()
    for out in (pre, pre / "sub"):
        with pytest.raises(RunFolderError, match="inside --init"):
            run_training([str(corpus)], init=str(pre), **quick(out, overwrite=True))
    assert (pre / "model.safetensors").read_bytes() == weights and not (pre / "sub").exists()


def test_out_that_is_a_file_is_refused(tmp_path, corpus, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    code, err = cli(capsys, "train", corpus, "--out", out, "--max-steps", 1)
    assert code == 2 and "is a file, not a folder" in err and len(err.strip().splitlines()) == 1
    assert out.read_text() == "mine"


def test_overwrite_removes_only_what_a_run_wrote(tmp_path, corpus):
    out = tmp_path / "run"
    run_training([str(corpus)], **TINY, log=lambda m: None, **quick(out, max_steps=1))
    (out / "notes.txt").write_text("mine")
    run_training([str(corpus)], **TINY, log=lambda m: None, **quick(out, max_steps=1, overwrite=True))
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").is_file()


def test_resume_after_the_text_changed_is_refused(run_copy, capsys):
    out, text = run_copy
    tokenizer_json = (out / "tokenizer" / "tokenizer.json").read_bytes()
    text.write_text("完全不同的文本。\n" * 500, encoding="utf-8")
    with pytest.raises(DataError, match=f"{text}.*since the run started"):
        run_training([str(text)], **TINY, **quick(out, max_steps=4, resume=True))
    assert (out / "tokenizer" / "tokenizer.json").read_bytes() == tokenizer_json  # not retrained
    assert [p.name for p in list_checkpoints(out)] == ["step-0000001", "step-0000002"]


def test_resume_on_raw_text_reuses_the_run_tokenizer(run_copy):
    out, text = run_copy
    result = run_training([str(text)], **TINY, log=lambda m: None, **quick(out, max_steps=3, resume=True))
    assert result.step == 3


@pytest.fixture(scope="module")
def two_tokenizers(tmp_path_factory, sample_text):
    """Two BPE tokenizers with the same vocabulary size trained on different text."""
    root = tmp_path_factory.mktemp("toks")
    (root / "a.txt").write_text(sample_text, encoding="utf-8")
    (root / "b.txt").write_text(sample_text.upper()[::-1], encoding="utf-8")
    a = train_tokenizer([str(root / "a.txt")], vocab_size=280, out_dir=root / "a")
    b = train_tokenizer([str(root / "b.txt")], vocab_size=280, out_dir=root / "b")
    assert a.vocab_size == b.vocab_size and a.fingerprint != b.fingerprint
    return root


def test_data_with_another_tokenizer_is_refused(tmp_path, two_tokenizers):
    from gptforge.data import prepare

    prepare([str(two_tokenizers / "a.txt")], two_tokenizers / "a", tmp_path / "data")
    with pytest.raises(TokenizerError, match="not the one the dataset was prepared with"):
        run_training(
            data=str(tmp_path / "data"), tokenizer=str(two_tokenizers / "b"), size="tiny", **quick(tmp_path / "run")
        )
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_resume_with_other_data_is_refused(tmp_path, two_tokenizers):
    from gptforge.data import prepare

    prepare([str(two_tokenizers / "a.txt")], two_tokenizers / "a", tmp_path / "data")
    prepare([str(two_tokenizers / "b.txt")], two_tokenizers / "a", tmp_path / "other")
    kw = dict(size="tiny", log=lambda m: None)
    run_training(data=str(tmp_path / "data"), **kw, **quick(tmp_path / "run", max_steps=1))
    with pytest.raises(RunFolderError, match="training data changed since this checkpoint"):
        run_training(data=str(tmp_path / "other"), **kw, **quick(tmp_path / "run", max_steps=2, resume=True))


def test_resume_with_another_tokenizer_is_refused(run_copy, two_tokenizers):
    out, text = run_copy
    with pytest.raises(DataError, match="the tokenizer changed.*since the run started"):
        run_training([str(text)], tokenizer=str(two_tokenizers / "b"), **quick(out, max_steps=3, resume=True))


def test_second_run_into_the_same_folder_is_refused(tmp_path, corpus):
    out = tmp_path / "run"
    out.mkdir()
    with exclusive_lock(out, "training run"):
        with pytest.raises(
            RunFolderError, match=f"another gptforge training run is using this folder .pid {os.getpid()}"
        ):
            run_training([str(corpus)], **TINY, **quick(out))
    assert not (out / "tokenizer").exists()


def test_lock_left_by_a_crash_is_taken_over_with_a_message(tmp_path):
    (tmp_path / LOCK_NAME).write_text("pid 999999 on elsewhere")  # what a killed holder leaves
    said = []
    with exclusive_lock(tmp_path, "training run", said.append):
        pass
    assert said and "taking over the lock of an earlier training run that did not finish (pid 999999" in said[0]
    with exclusive_lock(tmp_path, "training run", said.append):  # a clean exit leaves nothing to take over
        pass
    assert len(said) == 1


@pytest.mark.slow
def test_lock_of_a_killed_process_is_released(tmp_path):
    code = (
        f"from gptforge.fsio import exclusive_lock\nimport time\nwith exclusive_lock({str(tmp_path)!r}):\n"
        "    print('held', flush=True)\n    time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderError, match=f"pid {proc.pid}"):
            with exclusive_lock(tmp_path):
                pass
    finally:
        proc.kill()
        proc.wait()
    said = []
    with exclusive_lock(tmp_path, "run", said.append):
        pass
    assert f"pid {proc.pid}" in said[0]


def test_damaged_newest_checkpoint_falls_back_to_the_previous(run_copy, capsys):
    out, text = run_copy
    newest = list_checkpoints(out)[-1] / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, as by a full disk outside gptforge
    result = run_training([str(text)], **TINY, **quick(out, max_steps=3, resume=True))
    said = capsys.readouterr().out
    assert "skipping damaged checkpoint" in said and "step-0000002" in said
    assert "resumed from" in said and "step-0000001 at step 1" in said and result.step == 3


def test_damaged_training_state_falls_back_too(run_copy, capsys):
    out, text = run_copy
    state = list_checkpoints(out)[-1] / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:200])
    result = run_training([str(text)], **TINY, **quick(out, max_steps=3, resume=True))
    assert "skipping damaged checkpoint" in capsys.readouterr().out and result.step == 3


def test_leftovers_of_killed_saves_are_cleaned_at_the_next_start(run_copy, capsys):
    out, text = run_copy
    (out / "checkpoints" / ".step-0000003.tmp-gptforge-0a1b2c3d-4242-x1y2z3w4").mkdir()  # names gptforge makes
    (out / "checkpoints" / ".step-0000003.tmp-gptforge-0a1b2c3d-4242-x1y2z3w4" / "model.safetensors").write_bytes(
        b"half"
    )
    (out / ".model.safetensors.tmp-gptforge-0a1b2c3d-4242").write_bytes(b"half")
    old = out / ".best.old-gptforge-0a1b2c3d-4242"
    os.replace(out / "best", old) if (out / "best").exists() else old.mkdir()
    run_training([str(text)], **TINY, **quick(out, max_steps=3, resume=True))
    assert not list(out.glob(".*tmp-*")) and not list((out / "checkpoints").glob(".*"))
    assert (out / "best").is_dir() and not old.exists()  # put back, not deleted
    assert "cleaned up" in capsys.readouterr().out


def test_clean_leftovers_keeps_everything_else(tmp_path):
    for name in ("a.txt", ".hidden", "x.tmp-1"):
        (tmp_path / name).write_text("keep")
    (tmp_path / ".a.txt.tmp-gptforge-0a1b2c3d-77").write_text("half")
    assert clean_leftovers(tmp_path) == [".a.txt.tmp-gptforge-0a1b2c3d-77"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "a.txt", "x.tmp-1"]


# --- options that train the wrong model ---------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--grad-clip", "-1"], "--grad-clip"),
        (["--min-lr-ratio", "-5"], "--min-lr-ratio"),
        (["--weight-decay", "-1"], "--weight-decay"),
        (["--warmup-steps", "-1"], "--warmup-steps"),
        (["--eval-tokens", "-1"], "--eval-tokens"),
        (["--sample-tokens", "-1"], "--sample-tokens"),
        (["--seed", "-1"], "--seed"),
        (["--lr", "-1"], "--lr "),
        (["--max-time", "nan"], "--max-time"),
        (["--max-time", "ten minutes"], "90s, 10m"),
        (["--init", "{pre}", "--size", "small"], "--size"),
        (["--init", "{pre}", "--n-layer", "3"], "--n-layer"),
        (["--init", "{pre}", "--attn-dropout", "0"], "--attn-dropout"),
        (["--dropout", "1"], "--dropout"),
        (["--attn-dropout", "-0.1"], "--attn-dropout"),
        (["--data", "{pre}"], "--data"),
        (["--resume", "--overwrite"], "--resume"),
        (["--tokenizer", "{pre}", "--vocab-size", "400"], "--vocab-size"),
        (["--block-size", "10000000"], "--block-size"),
        (["--batch-size", "4000000"], "--batch-size"),
        (["--device", "cuda"], "--device"),
        (["--init", "{pre}", "--freeze", "blocks:5"], "--freeze"),
        (["--size", "tiny", "--freeze", "fins"], "--freeze"),
    ],
)
def test_bad_options_are_refused_by_name_before_any_work(tmp_path, corpus, capsys, argv, flag):
    if flag == "--device" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    pre = tiny_model_folder(tmp_path / "pre")
    out = tmp_path / "run"
    try:
        code, err = cli(capsys, "train", corpus, "--out", out, "--max-steps", 1, *(a.format(pre=pre) for a in argv))
    except SystemExit as e:  # argparse's own check: usage, then the error line
        code, err = e.code, capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and flag in err and len(err.strip().splitlines()) == 1, err
    assert not (out / "tokenizer").exists() and not (out / "data").exists()  # refused before the work


def test_a_missing_input_is_refused_before_any_work(tmp_path, corpus, capsys):
    code, err = cli(capsys, "train", corpus, tmp_path / "nosuch.txt", "--out", tmp_path / "run", "--max-steps", 1)
    assert code == 2 and "nosuch.txt: no such file or folder" in err
    assert not (tmp_path / "run" / "tokenizer").exists()  # the tokenizer used to be trained first


def test_data_with_eval_file_or_inputs_is_refused(tmp_path, corpus):
    for extra in (dict(eval_inputs=[str(corpus)]), dict(inputs=[str(corpus)]), dict(line_by_line=True)):
        with pytest.raises(OptionError, match="--data"):
            run_training(data=str(tmp_path), **extra, **quick(tmp_path / "run"))


def test_init_block_size_beyond_context_is_refused_before_the_model_loads(tmp_path, corpus):
    pre = tiny_model_folder(tmp_path / "pre", n_positions=32)
    with pytest.raises(OptionError, match="--block-size 64 is larger than the model's context n_positions=32"):
        run_training([str(corpus)], init=str(pre), **quick(tmp_path / "run", block_size=64))
    assert not (tmp_path / "run" / "data").exists()


def test_demo_minutes_nan_and_prepare_shard_tokens(tmp_path, corpus, capsys):
    code, err = cli(capsys, "demo", "--minutes", "nan", "--out", tmp_path / "demo")
    assert code == 2 and ("--max-time" in err or "--minutes" in err), err
    tok = tmp_path / "tok"
    train_tokenizer([str(corpus)], vocab_size=280, out_dir=tok)
    for n in (0, -1):
        code, err = cli(capsys, "prepare", corpus, "--tokenizer", tok, "--out", tmp_path / "ds", "--shard-tokens", n)
        assert code == 2 and "--shard-tokens" in err and not (tmp_path / "ds").exists()
    code, err = cli(capsys, "prepare", corpus, "--tokenizer", tok, "--out", tmp_path / "ds", "--seed", -1)
    assert (
        code == 2 and "--seed -1: must be an integer" in err and not (tmp_path / "ds").exists()
    )  # was numpy's traceback


def test_generation_length_is_capped():
    from gptforge.options import SamplingOptions

    with pytest.raises(OptionError, match="max_new_tokens"):
        SamplingOptions.make(max_new_tokens=10**11)


# --- faults -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def as_another_user():
    """Run the block as a user without special rights (root reads everything, so it drops them for a while)."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@pytest.fixture
def shared_tmp():
    """A folder any user can enter (pytest's tmp_path is private to its owner)."""
    folder = Path(tempfile.mkdtemp(prefix="gptforge-perm-"))
    folder.chmod(0o777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_permission_denied_names_the_path(shared_tmp, sample_text, capsys):
    if not hasattr(os, "geteuid"):
        pytest.skip("POSIX permissions")
    text = shared_tmp / "secret.txt"
    text.write_text(sample_text)
    text.chmod(0o600)
    locked = shared_tmp / "locked"
    locked.mkdir(mode=0o755)
    readable = shared_tmp / "ok.txt"
    readable.write_text(sample_text)
    readable.chmod(0o644)
    with as_another_user():
        code, err = cli(capsys, "train", text, "--out", shared_tmp / "run", "--max-steps", 1)
        assert code == 2 and f"{text}: permission denied" in err, err
        code, err = cli(capsys, "train", readable, "--out", locked / "run", "--max-steps", 1)
        assert code == 2 and f"{locked / 'run'}: permission denied" in err, err
    assert not (locked / "run").exists()


def test_config_json_that_is_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not an object"):
        GPTConfig.load(tmp_path)


def test_cpu_out_of_memory_gets_the_readme_message(tmp_path, corpus, monkeypatch):
    from gptforge.train.loop import Trainer

    def allocate_too_much(self, *args, **kwargs):
        return torch.empty(1 << 50)  # the CPU allocator's real error

    monkeypatch.setattr(Trainer, "_micro_step", allocate_too_much)
    with pytest.raises(TrainingError, match="out of memory at step 0 .*Lower --batch-size"):
        run_training([str(corpus)], **TINY, log=lambda m: None, **quick(tmp_path / "run"))


def test_out_of_memory_outside_training_is_one_line(monkeypatch, capsys):
    import gptforge.cli.models as models

    monkeypatch.setattr(models, "cmd_info", lambda args: torch.empty(1 << 50))
    code, err = cli(capsys, "info", "tiny")
    assert code == 2 and "out of memory" in err and len(err.strip().splitlines()) == 1


def test_disk_full_names_the_path_and_leaves_nothing_half_written(tmp_path):
    target = tmp_path / "model.safetensors"

    def fill_the_disk(path):
        path.write_bytes(b"half")  # the write that fails has no file name, as a file object's write has none
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as e:
        atomic_write(target, fill_the_disk)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(target)
    assert list(tmp_path.iterdir()) == []


def test_disk_full_during_a_checkpoint_keeps_the_earlier_ones(tmp_path, monkeypatch, capsys):
    model = GPT(GPTConfig(vocab_size=300, n_positions=16, n_embd=32, n_layer=1, n_head=2))
    write = lambda folder: save_model(model, folder)  # noqa: E731
    save_checkpoint(tmp_path, 1, write, {"step": 1}, keep=3)

    def torch_save_on_a_full_disk(obj, f, *a, **k):
        raise RuntimeError(
            "[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/0: "
            "file write failed"
        )

    monkeypatch.setattr(torch, "save", torch_save_on_a_full_disk)
    with pytest.raises(OSError) as e:
        save_checkpoint(tmp_path, 2, write, {"step": 2}, keep=3)
    assert e.value.errno == errno.ENOSPC and "step-0000002" in e.value.filename
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-0000001"]
    assert load_training_state(tmp_path / "checkpoints" / "step-0000001")["step"] == 1
    from gptforge.fsio import describe_os_error

    assert "disk full" in describe_os_error(e.value) and "step-0000002" in describe_os_error(e.value)


@pytest.mark.slow
def test_disk_full_for_real_in_create_and_prepare(tmp_path, corpus):
    """The file-size limit makes real writes fail inside safetensors, torch and numpy, as a full disk does."""
    tok = tmp_path / "tok"
    train_tokenizer([str(corpus)], vocab_size=280, out_dir=tok)
    big = tmp_path / "big.txt"
    big.write_text(corpus.read_text() * 40)
    limit = (
        "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (60000, 60000)); from gptforge.cli import main; "
        "sys.exit(main(sys.argv[1:]))"
    )
    for argv, out in (
        (["create", "tiny", "--out", tmp_path / "model"], tmp_path / "model"),
        (["prepare", big, "--tokenizer", tok, "--out", tmp_path / "ds", "--quiet"], tmp_path / "ds"),
    ):
        proc = subprocess.run(
            [sys.executable, "-c", limit, *map(str, argv)], capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 2 and "disk full" in proc.stderr and str(out) in proc.stderr, proc.stderr
        assert not out.exists() and not list(tmp_path.glob(f".{out.name}.tmp-*"))


def test_damaged_trainer_state_is_one_clean_error(tmp_path):
    (tmp_path / "trainer_state.pt").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(CheckpointError, match="damaged") as e:
        load_training_state(tmp_path)
    assert "weights_only" not in str(e.value)


def test_sharded_index_outside_the_folder_is_refused(tmp_path):
    from gptforge.checkpoint import read_state_dict

    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"a": "../../etc/passwd"}}')
    with pytest.raises(CheckpointError, match="outside the model folder"):
        read_state_dict(tmp_path)


# --- Ctrl-C, globs, permissions, memory -----------------------------------------------------------------


def test_ctrl_c_stops_tokenizer_training_at_once(monkeypatch):
    """Ctrl-C while the native trainer merges (all text read): the call ends at once, the merging thread is left."""
    import random
    import threading

    import gptforge.data.reading as reading

    rng = random.Random(0)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 12))) for _ in range(100_000)
    ]
    texts = [" ".join(rng.choice(words) for _ in range(200)) for _ in range(3000)] + ["the end"]
    read_all, real = threading.Event(), reading.split_long

    def split(text, *a):
        if text == "the end":
            read_all.set()
        return real(text, *a)

    def press_ctrl_c():
        read_all.wait(120)
        threading.Event().wait(0.5)  # well into the merges
        _thread.interrupt_main()

    import tokenizers

    finished, real_tokenizer = [], tokenizers.Tokenizer

    class Watched:  # the tokenizers Tokenizer, noting when training has run to its end
        def __init__(self, model):
            object.__setattr__(self, "real", real_tokenizer(model))

        def __getattr__(self, name):
            return getattr(self.real, name)

        def __setattr__(self, name, value):
            setattr(self.real, name, value)

        def train_from_iterator(self, *args, **kwargs):
            self.real.train_from_iterator(*args, **kwargs)
            finished.append(True)

    monkeypatch.setattr(tokenizers, "Tokenizer", Watched)
    monkeypatch.setattr(reading, "split_long", split)
    threading.Thread(target=press_ctrl_c, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        train_tokenizer([], texts=texts, vocab_size=30000, min_frequency=1, out_dir=None)
    assert not finished  # the call ended while the trainer was still merging, not after it
    for t in threading.enumerate():
        if t.name == "gptforge-tokenizer-training":
            t.join()


def test_interrupted_before_the_first_checkpoint_says_how_to_start_again(tmp_path, corpus, monkeypatch):
    import gptforge.data.vocabulary

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(gptforge.data.vocabulary, "train_tokenizer", interrupted)
    said = []
    with pytest.raises(KeyboardInterrupt):
        run_training([str(corpus)], **TINY, log=said.append, **quick(tmp_path / "run"))
    assert "nothing to resume: run the same command again" in said[-1]


@pytest.mark.slow
def test_sigterm_stops_the_command_cleanly(tmp_path, sample_text):
    """`kill` (SIGTERM) once all text is read, while the tokenizer trainer works: a clean stop, exit 130."""
    (tmp_path / "a.txt").write_text(sample_text * 50 + "\n\nTHE END\n")
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import os, signal, sys\nimport gptforge.data.reading as reading\nfrom gptforge.cli import main\n"
        "real = reading.split_long\n"
        "def split(text, *a):\n"
        "    if text.startswith('THE END'):\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return real(text, *a)\n"
        "reading.split_long = split\nsys.exit(main(sys.argv[1:]))\n"
    )
    proc = subprocess.run(
        [
            sys.executable,
            str(driver),
            "tokenizer",
            "train",
            str(tmp_path / "a.txt"),
            "--out",
            str(tmp_path / "tok"),
            "--vocab-size",
            "20000",
            "--min-frequency",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 130 and "interrupted" in proc.stderr, proc.stderr
    assert not (tmp_path / "tok" / "tokenizer.json").exists()


def test_symlink_loops_in_globs_read_each_file_once(tmp_path):
    from gptforge.data.reading import resolve_inputs

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("hello")
    (tmp_path / "docs" / "loop").symlink_to(tmp_path / "docs")
    (tmp_path / "docs" / "same.txt").symlink_to(tmp_path / "docs" / "a.txt")
    found = resolve_inputs(
        [str(tmp_path / "docs" / "**" / "*.txt"), str(tmp_path / "docs"), str(tmp_path / "docs" / "a.txt")]
    )
    assert found == [tmp_path / "docs" / "a.txt"]


def test_a_file_in_both_train_and_validation_is_refused(tmp_path, corpus):
    from gptforge.data import prepare

    tok = train_tokenizer([str(corpus)], vocab_size=280, out_dir=None)
    with pytest.raises(DataError, match="both a training and a validation input"):
        prepare([str(corpus)], tok, tmp_path / "ds", val_inputs=[str(corpus)])


def test_written_files_honour_the_umask(tmp_path, corpus):
    from gptforge.data import prepare

    old = os.umask(0o022)
    try:
        tok = train_tokenizer([str(corpus)], vocab_size=280, out_dir=tmp_path / "tok")
        prepare([str(corpus)], tok, tmp_path / "ds")
        run_training(data=str(tmp_path / "ds"), size="tiny", log=lambda m: None, **quick(tmp_path / "run", max_steps=1))
    finally:
        os.umask(old)
    run = tmp_path / "run"
    for path in (
        run / "model.safetensors",
        run / "config.json",
        list_checkpoints(run)[0] / "model.safetensors",
        tmp_path / "ds" / "meta.json",
        tmp_path / "tok" / "tokenizer.json",
    ):
        assert path.stat().st_mode & 0o777 == 0o644, path
    for path in (run / "checkpoints", list_checkpoints(run)[0], tmp_path / "ds", tmp_path / "ds" / "tokenizer"):
        assert path.stat().st_mode & 0o777 == 0o755, path


def test_tokenizer_training_sees_bounded_pieces_with_the_same_merges(monkeypatch):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    import gptforge.data.reading as reading
    from gptforge.data.reading import split_long

    line = " ".join(f"word{i % 97}, then more{i % 13}." for i in range(4000))  # one long line, no line breaks
    pieces = list(split_long(line, 1000))
    assert "".join(pieces) == line and len(pieces) > 50 and max(map(len, pieces)) <= 1000

    def vocab(texts):
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, show_progress=False))
        return hf.get_vocab()

    assert vocab(pieces) == vocab([line])  # cut only where the words cannot change

    seen = []
    real = reading.split_long
    monkeypatch.setattr(reading, "split_long", lambda text, *a: [seen.append(p) or p for p in real(text, *a)])
    train_tokenizer([], texts=[line * 40], vocab_size=300, out_dir=None)  # 4 MB in one line
    assert len(seen) >= 4 and max(map(len, seen)) <= reading.JOB_CHARS


def test_eval_max_tokens_reads_only_the_start(tmp_path, hf_gpt2_dir, byte_tokenizer):
    from gptforge.checkpoint import load_model
    from gptforge.evaluate import evaluate_text
    from gptforge.options import EvalOptions

    model = load_model(hf_gpt2_dir)
    seen = []
    encode = byte_tokenizer.encode
    byte_tokenizer.encode = lambda text: seen.append(len(text)) or encode(text)
    (tmp_path / "long.txt").write_text("abcdefgh " * 200_000)
    result = evaluate_text(model, byte_tokenizer, [tmp_path / "long.txt"], EvalOptions(max_tokens=100, block_size=32))
    assert result.tokens == 100 and sum(seen) < 100_000  # the text's first 100 tokens, each scored


# --- inputs of a second hostile sweep (2026-12-02) -------------------------------------------------------


@pytest.fixture(scope="module")
def small_tok(tmp_path_factory, corpus) -> Path:
    """The folder of a 280-token tokenizer of `corpus`."""
    folder = tmp_path_factory.mktemp("tok")
    assert train_tokenizer([str(corpus)], vocab_size=280, out_dir=folder).vocab_size == 280
    return folder


def test_a_folder_input_never_reads_the_run_or_data_folder_inside_it(tmp_path, corpus, small_tok, monkeypatch):
    import json

    from gptforge.data import prepare

    texts = tmp_path / "texts"
    texts.mkdir()
    shutil.copy(corpus, texts / "a.txt")
    out = texts / "run"  # `gptforge train .` in the folder of the texts: the default --out is ./run
    run_training([str(texts)], **TINY, log=lambda m: None, **quick(out))
    meta = json.loads((out / "data" / "meta.json").read_text())
    assert [Path(i["path"]).name for i in meta["inputs"]] == ["a.txt"]  # not run/tokenizer/merges.txt
    run_training([str(texts)], **TINY, log=lambda m: None, **quick(out, max_steps=3, resume=True))  # nothing "new"
    assert list_checkpoints(out)[-1].name == "step-0000003"
    first = prepare([str(texts)], small_tok, texts / "data")
    again = prepare([str(texts)], small_tok, texts / "data")  # its own shards and tokenizer are not inputs
    assert again["reused"] and [Path(i["path"]).name for i in first["inputs"]] == ["a.txt"]
    # a text folder with a stray tokenizer.json of its own is still text (only a model's or run's pair of files is not)
    (texts / "project").mkdir()
    shutil.copy(corpus, texts / "project" / "notes.txt")
    (texts / "project" / "tokenizer.json").write_text("{}")
    assert any(Path(i["path"]).name == "notes.txt" for i in prepare([str(texts)], small_tok, tmp_path / "d2")["inputs"])
    # an output folder that holds the inputs excludes nothing: the README's train_tokenizer("texts") writes to "."
    monkeypatch.chdir(tmp_path)
    assert train_tokenizer("texts", vocab_size=280).vocab_size == 280
    assert train_tokenizer("texts/*.txt", vocab_size=280, out_dir="texts/tok").vocab_size == 280


def test_one_document_gets_the_tail_split_whatever_the_seed(tmp_path, sample_text, small_tok):
    from gptforge.data import prepare

    book = tmp_path / "book.txt"
    book.write_text(" ".join(sample_text.split()))  # one document: no blank lines
    for seed in range(10):  # with seed 3 the draw sent the only document to validation: "no text left"
        meta = prepare([str(book)], small_tok, tmp_path / f"d{seed}", seed=seed)
        assert meta["val_split"] == "tail" and meta["train"]["tokens"] > 8 * meta["val"]["tokens"] > 0


def test_line_separators_inside_json_and_csv_rows_stay_text(tmp_path):
    import json

    from gptforge.data.reading import iter_texts

    (tmp_path / "r.jsonl").write_text(
        json.dumps({"text": "a\u2028b"}, ensure_ascii=False) + "\n" + '{"text": "c"}\n', encoding="utf-8"
    )
    assert list(iter_texts([str(tmp_path / "r.jsonl")])) == ["a\u2028b", "c"]
    (tmp_path / "r.csv").write_text("id,text\n1,hello\u2028world\n2,plain\n", encoding="utf-8")
    assert list(iter_texts([str(tmp_path / "r.csv")], column="text")) == ["hello\u2028world", "plain"]
    (tmp_path / "n.csv").write_text("one\x85row\r\nmac\rlast", encoding="utf-8")
    assert list(iter_texts([str(tmp_path / "n.csv")], header=False)) == ["one\x85row", "mac", "last"]


def test_a_lone_surrogate_escape_names_the_row_or_becomes_a_replacement(tmp_path, capsys):
    from gptforge.data.reading import iter_texts

    rows = tmp_path / "tweets.jsonl"
    rows.write_text('{"text": "fine"}\n{"text": "half \\ud83d an emoji"}\n')
    code, err = cli(capsys, "tokenizer", "train", rows, "--out", tmp_path / "tok", "--vocab-size", 300)
    assert code == 2 and f"{rows}:2: a lone surrogate escape (\\ud83d)" in err and "--encoding-errors replace" in err
    assert list(iter_texts([str(rows)], encoding_errors="replace")) == ["fine", "half \ufffd an emoji"]


def test_a_model_smaller_than_the_datasets_vocabulary_is_refused_before_training(tmp_path, corpus, small_tok):
    from gptforge.data import prepare
    from gptforge.train import train

    prepare([str(corpus)], small_tok, tmp_path / "data")
    model = GPT(GPTConfig(vocab_size=200, n_positions=32, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(
        TokenizerError, match=r"data: prepared with a tokenizer of 280 tokens but the model has vocab_size=200"
    ):
        train(
            model,
            str(tmp_path / "data"),
            out_dir=str(tmp_path / "run"),
            max_steps=2,
            batch_size=2,
            block_size=16,
            progress=False,
        )
    assert not list((tmp_path / "run").glob("[!.]*"))  # nothing written (the lock file is all there is)


def test_a_file_name_that_is_not_utf8_is_read_and_recorded(tmp_path, sample_text, small_tok):
    import json

    from gptforge.data import prepare

    (tmp_path / "in").mkdir()
    try:
        (tmp_path / "in" / os.fsdecode(b"caf\xe9.txt")).write_text(sample_text)
    except (OSError, UnicodeError) as e:  # some filesystems (macOS APFS) refuse such names outright
        pytest.skip(f"this filesystem takes no file name that is not UTF-8 ({e})")
    meta = prepare([str(tmp_path / "in")], small_tok, tmp_path / "data")
    assert meta["train"]["tokens"] > 0
    assert (
        json.loads((tmp_path / "data" / "meta.json").read_text(encoding="utf-8"))["inputs"][0]["path"]
        == meta["inputs"][0]["path"]
    )


def test_out_that_is_a_file_or_the_working_folder(tmp_path, corpus, small_tok, capsys, monkeypatch):
    (tmp_path / "notes.txt").write_text("mine")
    code, err = cli(capsys, "tokenizer", "train", corpus, "--out", tmp_path / "notes.txt", "--vocab-size", 300)
    assert code == 2 and "notes.txt: is a file, not a folder" in err and (tmp_path / "notes.txt").read_text() == "mine"
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # replacing the folder you are in would leave the shell in a deleted one
    code, err = cli(capsys, "prepare", corpus, "--tokenizer", small_tok, "--out", ".")
    assert code == 2 and ".: is the folder you are working in" in err and work.is_dir()


def test_small_inputs_and_other_encodings_get_true_messages(tmp_path, sample_text, capsys):
    from gptforge.data.reading import ReadOptions, resolve_inputs
    from gptforge.options import parse_duration

    (tmp_path / "upper").mkdir()
    (tmp_path / "upper" / "A.TXT").write_text(sample_text)
    assert resolve_inputs([str(tmp_path / "upper")], extensions=ReadOptions(extensions=(".TXT",)).extensions) == [
        tmp_path / "upper" / "A.TXT"
    ]
    (tmp_path / "hi.txt").write_text("Hello world\n")
    code, err = cli(capsys, "tokenizer", "train", tmp_path / "hi.txt", "--out", tmp_path / "t1")
    assert code == 2 and "too little text (11 characters)" in err and "--min-frequency" in err
    (tmp_path / "notepad.txt").write_bytes("hello there".encode("utf-16"))
    code, err = cli(capsys, "tokenizer", "train", tmp_path / "notepad.txt", "--out", tmp_path / "t2")
    assert code == 2 and "UTF-16 text" in err and "NUL byte" not in err
    assert parse_duration("1h30") == parse_duration("1h30m") == 5400 and parse_duration("10m30") == 630
    with pytest.raises(OptionError):
        parse_duration("10s30")


class _NoRun:
    val_loss, interrupted = None, False


def test_config_file_switches_and_numbers_mean_what_the_flags_do(tmp_path, monkeypatch):
    import gptforge.train.pipeline as pipeline

    seen = {}
    monkeypatch.setattr(pipeline, "run_training", lambda inputs, **kw: seen.update(kw, inputs=inputs) or _NoRun())
    # `no-overwrite: true` is overwrite off (it used to turn overwrite on, and replaced the run in --out)
    (tmp_path / "run.yaml").write_text(
        "inputs: [a.csv]\nno-overwrite: true\nno-tie-embeddings: true\ncolumn: 1\nsample-prompt: 1984\nsize: tiny\n"
    )
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "r")]) == 0
    assert seen["overwrite"] is False and seen["model_overrides"]["tie_word_embeddings"] is False
    assert seen["read_options"]["column"] == 1 and seen["sample_prompt"] == "1984"
    (tmp_path / "on.yaml").write_text("inputs: [a.txt]\noverwrite: true\ntie-embeddings: true\n")
    assert main(["train", "--config", str(tmp_path / "on.yaml"), "--out", str(tmp_path / "r")]) == 0
    assert seen["overwrite"] is True and seen["model_overrides"]["tie_word_embeddings"] is True
    (tmp_path / "bad.yaml").write_text("inputs: [a.txt]\nsample-prompt: {a: 1}\n")
    assert main(["train", "--config", str(tmp_path / "bad.yaml")]) == 2


def test_an_int8_folder_is_refused_for_training_before_any_work(tmp_path, corpus, capsys):
    from gptforge.checkpoint import quantize_folder
    from gptforge.classify import build_classifier

    int8 = quantize_folder(tiny_model_folder(tmp_path / "fp32"), tmp_path / "int8")
    code, err = cli(capsys, "train", corpus, "--init", int8, "--max-steps", 1, "--out", tmp_path / "run")
    assert code == 2 and "an int8 model folder cannot be trained; give the fp32 base model" in err  # was a traceback
    assert not (tmp_path / "run").exists()
    with pytest.raises(OptionError, match="an int8 model folder cannot be trained"):  # was an unusable classifier
        build_classifier(str(int8), ["a", "b"], 0)


def test_prompts_may_follow_the_options(finished_run, capsys):
    code = main(["generate", str(finished_run), "--max-new-tokens", "2", "--greedy", "--no-stream", "first", "second"])
    out = capsys.readouterr().out
    assert code == 0 and "first" in out and "second" in out  # `generate MODEL --chat "question"` used to be refused
    # what is not a prompt is still an error, in one line
    assert main(["generate", str(finished_run), "--max-new-tokens", "2", "--bogus", "first"]) == 2
    assert "unrecognized option --bogus" in capsys.readouterr().err
    assert (
        main(["generate", str(finished_run), "--max-new-tokens", "2", "--greedy", "--no-stream", "--", "-5 degrees"])
        == 0
    )
    assert "-5 degrees" in capsys.readouterr().out  # after `--`, a prompt may start with "-"


def test_resume_with_other_frozen_layers_or_adapters_is_refused(tmp_path, corpus, finished_run):
    from gptforge.options import LoRAOptions

    # each used to end in a traceback (the optimizer's state of other parameters), or, for LoRA's alpha, to
    # rescale the trained adapter without a word
    frozen = tmp_path / "frozen"
    run_training(
        [str(corpus)], init=str(finished_run), freeze="embeddings,blocks:1", log=lambda m: None, **quick(frozen)
    )
    run_training(
        [str(corpus)],
        init=str(finished_run),
        freeze="all-but:0",
        log=lambda m: None,
        **quick(frozen, max_steps=3, resume=True),
    )  # the same layers named otherwise resume (1 layer)
    with pytest.raises(RunFolderError, match="--freeze embeddings,blocks:1 then, none now"):
        run_training(
            [str(corpus)], init=str(finished_run), log=lambda m: None, **quick(frozen, max_steps=4, resume=True)
        )
    adapter = tmp_path / "adapter"
    run_training(
        [str(corpus)], init=str(finished_run), lora=LoRAOptions(lora_r=2), log=lambda m: None, **quick(adapter)
    )
    with pytest.raises(RunFolderError, match="--lora-alpha 16.0 then, 64.0 now"):
        run_training(
            [str(corpus)],
            init=str(finished_run),
            lora=LoRAOptions(lora_r=2, lora_alpha=64.0),
            log=lambda m: None,
            **quick(adapter, max_steps=3, resume=True),
        )
    with pytest.raises(RunFolderError, match="--lora-r 2 then, none now"):
        run_training(
            [str(corpus)], init=str(finished_run), log=lambda m: None, **quick(adapter, max_steps=3, resume=True)
        )
    run_training(
        [str(corpus)],
        init=str(finished_run),
        lora=LoRAOptions(lora_r=2),
        log=lambda m: None,
        **quick(adapter, max_steps=3, resume=True),
    )  # the same options resume
    assert list_checkpoints(adapter)[-1].name == "step-0000003"


def test_an_output_folder_never_replaces_what_the_command_reads(tmp_path, corpus, finished_run, capsys):
    from gptforge.options import LoRAOptions

    base = tmp_path / "base"
    shutil.copytree(finished_run, base)
    adapter = tmp_path / "adapter"
    run_training([str(corpus)], init=str(base), lora=LoRAOptions(lora_r=2), log=lambda m: None, **quick(adapter))
    before = sorted(p.name for p in base.iterdir()), sorted(p.name for p in adapter.iterdir())
    # with --force these used to replace the run folders they read: checkpoints, data and best/ gone
    (tmp_path / "link").symlink_to(base)  # the same folder by another name
    for argv in (
        ["merge", base, adapter, "--out", base, "--force"],
        ["merge", base, adapter, "--out", adapter, "--force"],
        ["quantize", base / "best", "--out", base, "--force"],
        ["export", base / "best", tmp_path, "--force"],
        ["export", tmp_path / "link" / "best", base, "--force"],
    ):
        code, err = cli(capsys, *argv)
        assert code == 2 and "which this command reads and would replace" in err, (argv, err)
    assert (sorted(p.name for p in base.iterdir()), sorted(p.name for p in adapter.iterdir())) == before


def test_instruction_runs_refuse_plain_text_options_and_a_changed_mask_on_resume(tmp_path, finished_run):
    import json

    from gptforge.options import InstructOptions

    rows = tmp_path / "qa.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"Q{i} ", "completion": f"answer {i}"}) + "\n" for i in range(20)))
    out = tmp_path / "run"
    with pytest.raises(OptionError, match="--line-by-line: for plain text"):  # used to be ignored without a word
        run_training([str(rows)], init=str(finished_run), line_by_line=True, log=lambda m: None, **quick(out))
    run_training([str(rows)], init=str(finished_run), log=lambda m: None, **quick(out))
    with pytest.raises(RunFolderError, match="--train-on-prompt False then, True now"):  # used to go on, other examples
        run_training(
            [str(rows)],
            init=str(finished_run),
            instruct=InstructOptions(train_on_prompt=True),
            log=lambda m: None,
            **quick(out, max_steps=3, resume=True),
        )


def test_a_resumed_run_continues_its_records_without_repeating_steps(tmp_path, corpus):
    import json

    out = tmp_path / "run"
    opts = dict(save_steps=1, eval_interval=1, sample_interval=1, max_steps=3)
    run_training([str(corpus)], **TINY, log=lambda m: None, **quick(out, **opts))
    shutil.rmtree(out / "checkpoints" / "step-0000003")  # as after a kill -9 before the last save
    shutil.rmtree(out / "checkpoints" / "step-0000002")
    result = run_training([str(corpus)], **TINY, log=lambda m: None, **quick(out, resume=True, **opts))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if "loss" in r]
    assert train_steps == sorted(set(train_steps)) == [1, 2, 3]  # steps 2 and 3 used to be there twice
    assert [r["step"] for r in result.history if "loss" in r] == [1, 2, 3]  # loss.png draws the whole run
    samples = (out / "samples.txt").read_text()
    assert samples.count("=== step 2 ===") == 1 and samples.count("=== step 1 ===") == 1
    finals = lambda: sum(
        1
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if '"val_loss"' in line  # noqa: E731
        and json.loads(line)["step"] == 3
    )
    before = finals()
    run_training([str(corpus)], **TINY, log=lambda m: None, **quick(out, resume=True, **opts))  # a finished run again
    assert finals() == before  # its final evaluation is taken again, not written twice


def test_sample_tokens_zero_writes_no_samples(tmp_path, corpus):
    run_training(
        [str(corpus)], **TINY, log=lambda m: None, **quick(tmp_path / "run", sample_interval=1, sample_tokens=0)
    )
    assert not (tmp_path / "run" / "samples.txt").exists()  # used to hold empty "=== step N ===" blocks


def test_evaluating_a_missing_file_or_a_folder_is_an_error_not_text(tmp_path, hf_gpt2_dir, byte_tokenizer, monkeypatch):
    from gptforge.checkpoint import load_model
    from gptforge.errors import NotFoundError
    from gptforge.evaluate import evaluate_text

    model = load_model(hf_gpt2_dir)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NotFoundError, match="valid.txt: no such file"):  # used to score the nine characters "valid.txt"
        evaluate_text(model, byte_tokenizer, "valid.txt")
    (tmp_path / "data" / "texts").mkdir(parents=True)
    with pytest.raises(DataError, match="data/texts: a folder"):
        evaluate_text(model, byte_tokenizer, ["data/texts"])
    assert evaluate_text(model, byte_tokenizer, "a sentence to score.").tokens > 0  # text is still text
    assert evaluate_text(model, byte_tokenizer, ["data"]).tokens == 4  # a one-word text, though a folder has its name


def test_eval_max_tokens_scores_that_many_of_prepared_data_too(tmp_path, corpus, small_tok, hf_gpt2_dir, capsys):
    from gptforge.checkpoint import load_model
    from gptforge.data import prepare
    from gptforge.evaluate import evaluate_prepared

    prepare([str(corpus)], small_tok, tmp_path / "data")
    model = load_model(hf_gpt2_dir)
    assert evaluate_prepared(model, tmp_path / "data", max_tokens=50).tokens == 50  # was 49; a text's 50 are 50
    (tmp_path / "texts").mkdir()
    code, err = cli(capsys, "eval", hf_gpt2_dir, tmp_path / "texts")
    assert code == 2 and "a folder without meta.json" in err  # was "no such file" for a folder that exists
    assert evaluate_prepared(model, tmp_path / "data", max_tokens=1).tokens == 1  # one token is a number of tokens


def test_a_kill_between_best_and_its_checkpoint_resumes_exactly(tmp_path, corpus, monkeypatch):
    from gptforge.train.loop import Trainer

    opts = dict(save_steps=1, eval_interval=2, early_stopping=1, max_steps=6, eval_tokens=10**9)  # evaluations whole
    run_training([str(corpus)], **TINY, log=lambda m: None, **quick(tmp_path / "whole", **opts))
    save = Trainer.save_checkpoint

    class Killed(BaseException):
        pass

    def killed_at_4(self):  # step 4's evaluation improved and wrote best/; the process dies before its checkpoint
        if self.step == 4:
            raise Killed
        return save(self)

    monkeypatch.setattr(Trainer, "save_checkpoint", killed_at_4)
    with pytest.raises(Killed):
        run_training([str(corpus)], **TINY, log=lambda m: None, **quick(tmp_path / "cut", **opts))
    monkeypatch.setattr(Trainer, "save_checkpoint", save)
    run_training([str(corpus)], **TINY, log=lambda m: None, **quick(tmp_path / "cut", resume=True, **opts))
    # the resumed run took best/'s score for its own, found step 4 "no improvement" and stopped early there
    whole, resumed = load_model_state(tmp_path / "whole"), load_model_state(tmp_path / "cut")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def load_model_state(folder: Path) -> dict:
    from gptforge.checkpoint import load_model

    return load_model(folder).state_dict()


def test_an_input_that_changes_while_prepare_reads_it_is_refused(tmp_path, sample_text, small_tok, monkeypatch):
    import gptforge.data.shards as shards
    from gptforge.data import prepare

    text = tmp_path / "growing.txt"
    text.write_text(sample_text)
    route = shards._route

    def written_to_meanwhile(*args, **kwargs):  # another program appends while the shards are written
        with open(text, "a") as f:
            f.write("more text\n")
        return route(*args, **kwargs)

    monkeypatch.setattr(shards, "_route", written_to_meanwhile)
    with pytest.raises(DataError, match="growing.txt: changed while it was read"):  # was kept, and reused later
        prepare([str(text)], small_tok, tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_out_through_a_link_under_a_file_or_with_a_long_name(tmp_path, corpus, small_tok, capsys):
    import hashlib
    import socket

    from gptforge.data import prepare

    elsewhere = tmp_path / "other-disk" / "data"
    elsewhere.mkdir(parents=True)
    (tmp_path / "link").symlink_to(elsewhere)
    prepare([str(corpus)], small_tok, tmp_path / "link")  # used to replace the link by a folder here
    assert (tmp_path / "link").is_symlink() and (elsewhere / "meta.json").is_file()
    code, err = cli(capsys, "prepare", corpus, "--tokenizer", small_tok, "--out", corpus / "sub")
    assert code == 2 and "part of this path is a file" in err  # was a FileExistsError traceback
    long = tmp_path / ("y" * 250)  # a legal name; ".NAME.tmp-XXXX" beside it used to be too long
    assert prepare([str(corpus)], small_tok, long)["train"]["tokens"] > 0
    gone = subprocess.Popen(["true"])  # a process that has ended: its pid names no live process
    gone.wait()
    host = hashlib.blake2b(socket.gethostname().encode(), digest_size=4).hexdigest()
    stale = tmp_path / f".data.tmp-gptforge-{host}-{gone.pid}-x1y2z3w4"  # left by a killed prepare
    stale.mkdir()
    prepare([str(corpus)], small_tok, tmp_path / "data")
    assert not stale.exists()


def test_a_resume_with_another_batch_says_so(run_copy, corpus, capsys):
    out, _ = run_copy
    said = []
    run_training([str(corpus)], **TINY, log=said.append, **quick(out, max_steps=3, resume=True, batch_size=4))
    printed = capsys.readouterr()
    assert "note: --batch-size 2 then, 4 now" in printed.out + printed.err + "".join(said)  # was silent
