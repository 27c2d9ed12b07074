"""Several processes on the CPU (gloo): DDP and FSDP give the single-process result, and checkpoints
move between world sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from gptforge.checkpoint import load_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed"),
]

WORKER = textwrap.dedent("""
    import json, sys, torch
    from gptforge.config import GPTConfig
    from gptforge.model import GPT
    from gptforge.train import train

    args = json.loads(sys.argv[1])
    stop_at = args.pop("stop_at", None)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**args.pop("model")))

    def on_step(trainer):
        if trainer.step == stop_at:
            trainer.request_stop()

    train(model, args.pop("data"), on_step=on_step, **args)
""")

MODEL = dict(
    vocab_size=300,
    n_positions=16,
    n_embd=32,
    n_layer=2,
    n_head=2,
    bos_token_id=0,
    eos_token_id=0,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
)


OPTIONS = dict(  # the training options of every run here and in test_multinode.py
    block_size=16,
    max_steps=6,
    log_interval=1,
    eval_interval=3,
    eval_tokens=256,
    progress=False,
    plot=False,
    save_minutes=None,
    learning_rate=3e-3,
    warmup_steps=2,
    # fp32 products: bf16 inputs (what --precision auto takes where calibration measured them faster) turn the
    # rounding-level differences between one process and two ranks into flips of bf16's last bit (2^-8)
    precision="fp32",
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, sample_text):
    from gptforge.data import prepare
    from gptforge.data.vocabulary import train_tokenizer

    root = tmp_path_factory.mktemp("dist")
    (root / "text.txt").write_text(sample_text * 2, encoding="utf-8")
    tok = train_tokenizer([str(root / "text.txt")], vocab_size=300, out_dir=root / "tok")
    prepare([str(root / "text.txt")], tok, root / "data")
    return root / "data"


def run(tmp_path, out: str, data_dir, nproc: int = 1, **options) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    args = dict(model=MODEL, data=str(data_dir), out_dir=str(tmp_path / out), **OPTIONS)
    args.update(options)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, str(script), json.dumps(args)]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            str(script),
            json.dumps(args),
        ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def assert_same_weights(a, b, atol=1e-4):
    """Equal up to float rounding. Two ranks sum a batch in a different order than one process, and
    AdamW turns a rounding-level difference in a near-zero gradient into an update difference of up to
    about 1e-5 here; a real fault (a lost or repeated step, wrong data shards) moves weights by about
    the learning rate, 3e-3, thirty times the tolerance."""
    sa, sb = load_model(a).state_dict(), load_model(b).state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=atol, rtol=0, msg=k)


@pytest.fixture(scope="module")
def single(tmp_path_factory, data_dir):
    """The reference: one process, global batch 4, six steps."""
    tmp = tmp_path_factory.mktemp("single")
    run(tmp, "run", data_dir, batch_size=4)
    return tmp / "run"


def test_ddp_equals_one_process_with_the_same_global_batch(tmp_path, data_dir, single):
    run(tmp_path, "ddp", data_dir, nproc=2, batch_size=2)
    assert_same_weights(single, tmp_path / "ddp")
    rows = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]  # rank 0 alone writes


def test_ddp_checkpoint_resumes_in_one_process(tmp_path, data_dir, single):
    run(tmp_path, "mixed", data_dir, nproc=2, batch_size=2, stop_at=3)
    ckpt = tmp_path / "mixed" / "checkpoints" / "step-0000003"
    assert load_model(ckpt).config.n_embd == 32  # a DDP checkpoint is an ordinary model folder
    assert not (tmp_path / "mixed" / "model.safetensors").exists()  # stopped runs leave only checkpoints
    run(tmp_path, "mixed", data_dir, batch_size=4, resume=True)
    assert_same_weights(single, tmp_path / "mixed")


def test_fsdp_trains_resumes_and_saves_a_full_model(tmp_path, data_dir):
    run(tmp_path, "fsdp", data_dir, nproc=2, batch_size=2, fsdp=True, stop_at=3)
    run(tmp_path, "fsdp", data_dir, nproc=2, batch_size=2, fsdp=True, resume=True)
    # sharded, a run from scratch trains with AdamW and keeps no weight average (Muon and the average need
    # whole matrices): the same as one process told so
    run(tmp_path, "adamw", data_dir, batch_size=4, optimizer="adamw", ema=0)
    assert_same_weights(tmp_path / "adamw", tmp_path / "fsdp")
    assert (tmp_path / "fsdp" / "best" / "model.safetensors").is_file()


def test_cli_nproc_launches_torchrun(tmp_path, data_dir):
    out = tmp_path / "cli"
    cmd = [
        sys.executable,
        "-m",
        "gptforge",
        "train",
        "--nproc",
        "2",
        "--data",
        str(data_dir),
        "--size",
        "tiny",
        "--n-layer",
        "1",
        "--n-embd",
        "32",
        "--n-head",
        "2",
        "--block-size",
        "16",
        "--batch-size",
        "2",
        "--max-steps",
        "2",
        "--no-progress",
        "--no-plot",
        "--sample-tokens",
        "2",
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "world size 2" in done.stdout + done.stderr
    assert load_model(out).config.n_layer == 1


def test_nproc_ends_a_failed_run_with_its_one_line_error_and_code(tmp_path):
    # the launcher used to add its own 40-line traceback, exit 1, and each process printed the error
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gptforge",
            "train",
            str(tmp_path / "nosuch.txt"),
            "--nproc",
            "2",
            "--out",
            str(tmp_path / "run"),
            "--max-steps",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("nosuch.txt: no such file or folder") == 1 and "Traceback" not in proc.stderr
