"""Model files, export, options and kills, third round (issue 39): what a run folder, an adapter folder, a
config.json or a --config file may hold, and what the user gets. Each test is a row of docs/reliability.md."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


# --- 7: prepare's workers end with their parent ----------------------------------------------------------


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the process tree from /proc")
def test_prepare_workers_end_when_prepare_is_killed(tmp_path, sample_text):
    from gptforge.tokenizer import train_tokenizer

    train_tokenizer([], vocab_size=300, texts=[sample_text], out_dir=tmp_path / "tok")
    big = tmp_path / "big.txt"
    big.write_text((sample_text + "\n\n") * (16_000_000 // len(sample_text)), encoding="utf-8")
    script = (f"from gptforge.data import prepare\n"
              f"prepare([{str(big)!r}], {str(tmp_path / 'tok')!r}, {str(tmp_path / 'data')!r}, workers=2)\n")
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
    alive = [w for w in workers if Path(f"/proc/{w}").exists() and "Z" not in Path(f"/proc/{w}/stat").read_text()[:80]]
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
    from gptforge.fsio import atomic_dir
    from gptforge.tokenizer import train_tokenizer

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
