"""Two nodes simulated on one machine: two torchrun launchers on 127.0.0.1 that meet at one c10d rendezvous
(gloo, one process each) train exactly what one launcher with two processes trains, checkpoints move between
the two layouts, and a worker killed mid-run costs only the steps since the last checkpoint."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from test_distributed import MODEL, OPTIONS, assert_same_weights, data_dir, run  # noqa: F401 - data_dir is a fixture

from gptforge.checkpoint import load_model
from gptforge.train.state import list_checkpoints

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed"),
]

# the worker of test_distributed, which also records where it ran and which windows it read, and can die
WORKER = textwrap.dedent("""
    import faulthandler, json, os, signal, sys, torch
    faulthandler.register(signal.SIGUSR1)  # a stalled worker shows where it waits
    from gptforge.config import GPTConfig
    from gptforge.model import GPT
    from gptforge.train import train

    args = json.loads(sys.argv[1])
    stop_at, kill_at, record = args.pop("stop_at", None), args.pop("kill_at", None), args.pop("record")
    kill_rank, in_save = args.pop("kill_rank", 1), args.pop("kill_in_save", False)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**args.pop("model")))
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))

    def on_step(trainer):
        rank = trainer.dist.rank
        if not os.path.exists(f"{record}/{rank}-{os.getpid()}.json"):  # each process once, at its first step
            windows = [trainer.batches.starts(s).tolist() for s in range(args["max_steps"])]
            seen = dict(rank=rank, world=trainer.dist.world_size, node=os.environ["GROUP_RANK"], windows=windows)
            with open(f"{record}/{rank}-{os.getpid()}.json", "x") as f:
                json.dump(seen, f)
            if in_save and rank == kill_rank:  # die half-way through writing checkpoint `kill_at`
                save = trainer.task.save

                def dying_save(*a, **k):
                    save(*a, **k)  # the weights are written, the training state is not
                    if trainer.step == kill_at:
                        os.kill(os.getpid(), signal.SIGKILL)

                trainer.task.save = dying_save
        if trainer.step == kill_at and rank == kill_rank and attempt == 0 and not in_save:
            os.kill(os.getpid(), signal.SIGKILL)
        if trainer.step == stop_at:
            trainer.request_stop()

    train(model, args.pop("data"), on_step=on_step, **args)
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(tmp_path, out: str, data_dir, nproc: int = 1, restarts: int = 0, **options):  # noqa: F811
    """Two torchrun launchers, `nproc` processes each, that find each other through a c10d rendezvous on a
    free port; returns both launchers' (exit code, stderr) and the records of the ranks."""
    record = tmp_path / f"{out}-ranks"
    record.mkdir(exist_ok=True)
    script = tmp_path / "node_worker.py"
    script.write_text(WORKER)
    args = dict(model=MODEL, data=str(data_dir), out_dir=str(tmp_path / out), record=str(record), **OPTIONS)
    args.update(options)
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        f"--nproc-per-node={nproc}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        f"--rdzv-id={out}",
        f"--max-restarts={restarts}",
        "--monitor-interval=0.2",
        str(script),
        json.dumps(args),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # docs/multinode.md
    logs = [tmp_path / f"{out}-node{i}.log" for i in range(2)]  # files, not pipes: a full pipe would stall a node
    nodes = []
    for log in logs:
        with open(log, "w") as f:
            nodes.append(subprocess.Popen(launch, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True))
    try:  # the time a node may take is bounded: a launcher still running after it fails the test
        codes = [p.wait(timeout=240) for p in nodes]
    finally:
        for p in nodes:  # a launcher and its workers, if the test failed
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
    ended = [(code, log.read_text()) for code, log in zip(codes, logs)]
    seen = [json.loads(p.read_text()) for p in sorted(record.glob("*.json"))]
    return ended, seen


def losses(run_dir) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def one_node(tmp_path_factory, data_dir):  # noqa: F811
    """The reference: one launcher, two processes, batch 2 each (global batch 4), six steps."""
    tmp = tmp_path_factory.mktemp("one_node")
    run(tmp, "run", data_dir, nproc=2, batch_size=2, save_steps=2)
    return tmp / "run"


def test_two_nodes_train_what_one_node_trains(tmp_path, data_dir, one_node):  # noqa: F811
    ended, seen = two_nodes(tmp_path, "two", data_dir, batch_size=2, save_steps=2)
    assert [code for code, _ in ended] == [0, 0], ended[0][1][-3000:] + ended[1][1][-3000:]
    # every rank ran once, one on each launcher, in a world of two
    assert sorted(s["rank"] for s in seen) == [0, 1] and {s["world"] for s in seen} == {2}
    assert sorted(s["node"] for s in seen) == ["0", "1"]
    # at every step the two ranks read different windows
    for step in range(OPTIONS["max_steps"]):
        assert not set(seen[0]["windows"][step]) & set(seen[1]["windows"][step]), step
    torch.testing.assert_close(losses(tmp_path / "two"), losses(one_node), atol=1e-6, rtol=0)
    assert_same_weights(one_node, tmp_path / "two", atol=1e-6)


def test_checkpoints_move_between_two_nodes_and_one(tmp_path, data_dir, one_node):  # noqa: F811
    # written by two nodes, finished by one
    ended, _ = two_nodes(tmp_path, "a", data_dir, batch_size=2, save_steps=2, stop_at=4)
    assert [code for code, _ in ended] == [0, 0], ended[0][1][-3000:]
    assert (tmp_path / "a" / "checkpoints" / "step-0000004").is_dir()
    run(tmp_path, "a", data_dir, nproc=2, batch_size=2, save_steps=2, resume=True)
    assert_same_weights(one_node, tmp_path / "a", atol=1e-6)
    # written by one node (the reference run's checkpoint of step 2), finished by two
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(one_node / "checkpoints" / "step-0000002", tmp_path / "b" / "checkpoints" / "step-0000002")
    ended, _ = two_nodes(tmp_path, "b", data_dir, batch_size=2, save_steps=2, resume=True)
    assert [code for code, _ in ended] == [0, 0], ended[0][1][-3000:]
    assert_same_weights(one_node, tmp_path / "b", atol=1e-6)


def test_a_killed_worker_restarts_from_the_newest_checkpoint(tmp_path, data_dir, one_node):  # noqa: F811
    # rank 1 dies by SIGKILL after step 3 of the first attempt; torchrun starts both nodes' workers again, and
    # they continue from checkpoints/step-0000002 without being told: the unbroken run's weights, exactly
    ended, seen = two_nodes(tmp_path, "killed", data_dir, restarts=1, batch_size=2, save_steps=2, kill_at=3)
    assert [code for code, _ in ended] == [0, 0], ended[0][1][-3000:] + ended[1][1][-3000:]
    assert sorted((s["rank"], s["world"]) for s in seen) == [(0, 2), (0, 2), (1, 2), (1, 2)]  # two attempts
    log = (tmp_path / "killed" / "metrics.jsonl").read_text()
    assert "step-0000002" in "".join(e for _, e in ended) + log  # it said where it resumed from
    assert_same_weights(one_node, tmp_path / "killed", atol=1e-6)


def test_without_restarts_a_lost_worker_ends_the_run_and_is_named(tmp_path, data_dir):  # noqa: F811
    # rank 0 dies by SIGKILL half-way through writing checkpoint 4: rank 1 ends too, torchrun names rank 0,
    # and the newest checkpoint is the whole one of step 2 (the other is left under a temporary name)
    ended, _ = two_nodes(
        tmp_path, "lost", data_dir, batch_size=2, save_steps=2, kill_at=4, kill_rank=0, kill_in_save=True, max_steps=40
    )
    assert all(code != 0 for code, _ in ended)
    said = "".join(e for _, e in ended)
    assert re.search(r"rank\s*:\s*0 \(local_rank: 0\)\s*exitcode\s*:\s*-9", said), said[-3000:]
    newest = list_checkpoints(tmp_path / "lost")[-1]
    assert newest.name == "step-0000002"
    assert [p for p in (tmp_path / "lost" / "checkpoints").iterdir() if "0000004" in p.name and ".tmp" in p.name]
    assert load_model(newest).config.n_layer == MODEL["n_layer"]
