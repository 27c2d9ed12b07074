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
