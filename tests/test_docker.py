"""The Docker image: its entry point runs gptforge commands and any other program of the image (a shell), and,
where a Docker daemon is reachable, the image builds and runs as another user with the kernel compiled inside."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = ROOT / "docker-entrypoint.sh"


def _entry(args: list[str], tmp_path: Path) -> str:
    """Run the entry point with a stand-in `gptforge` that prints what it was asked."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stub = bin_dir / "gptforge"
    stub.write_text('#!/bin/sh\necho "gptforge $*"\n')
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["sh", str(ENTRYPOINT), *args], env=env, capture_output=True, text=True, check=True).stdout


def test_the_entry_point_runs_commands_and_programs(tmp_path):
    assert _entry(["train", "corpus.txt", "--out", "run"], tmp_path) == "gptforge train corpus.txt --out run\n"
    assert _entry(["--help"], tmp_path) == "gptforge --help\n"
    assert _entry(["info"], tmp_path) == "gptforge info\n"  # a gptforge command even where a program has its name
    assert _entry(["sh", "-c", "echo a shell"], tmp_path) == "a shell\n"  # `docker run IMAGE bash` gives a shell
    assert _entry(["no-such-program"], tmp_path) == "gptforge no-such-program\n"  # gptforge says what is wrong


def test_the_image_has_a_compiler_and_a_cache_any_user_can_write():
    text = (ROOT / "Dockerfile").read_text()
    assert "gcc" in text and "GPTFORGE_CACHE=/cache" in text and "chmod 1777 /cache /work" in text
    assert 'ENTRYPOINT ["docker-entrypoint.sh"]' in text


def _docker_works() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _docker_works(), reason="no Docker daemon reachable here (the image build needs one)")
def test_the_image_builds_and_runs_as_another_user(tmp_path):
    tag = "gptforge-test:latest"
    subprocess.run(["docker", "build", "-t", tag, str(ROOT)], check=True, capture_output=True)
    shell = subprocess.run(
        ["docker", "run", "--rm", tag, "sh", "-c", "command -v gcc && id -un"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "gcc" in shell and "gptforge" in shell
    user = f"{os.getuid() + 1000}:{os.getgid() + 1000}"
    tmp_path.chmod(0o777)
    subprocess.run(
        ["docker", "run", "--rm", "--user", user, "-v", f"{tmp_path}:/work", tag, "create", "tiny", "--out", "model"],
        check=True,
        capture_output=True,
    )
    assert (tmp_path / "model" / "config.json").is_file()
