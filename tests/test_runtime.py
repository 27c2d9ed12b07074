"""Device and precision settings, the torch version floor, and the switch of the CPU fast paths."""

from __future__ import annotations

import pytest
import torch

from gptforge import kernels, runtime
from gptforge.errors import OptionError
from gptforge.options import TrainConfig
from gptforge.train import optim


def test_cuda_runs_fp32_products_in_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        runtime.configure(torch.device("cpu"))
        assert not torch.backends.cuda.matmul.allow_tf32
        runtime.configure(torch.device("cuda"))  # only sets flags: no GPU needed
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_a_device_this_machine_lacks_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "gpu", "cuda:1"):
        with pytest.raises(OptionError, match="--device.*no CUDA GPU"):
            runtime.resolve_device(name)
    with pytest.raises(OptionError, match="not a device name"):
        runtime.resolve_device("tpu9")
    assert runtime.resolve_device("auto").type == "cpu"


def test_torch_floor_is_checked_where_it_matters(monkeypatch):
    with pytest.raises(OptionError, match=r"--fsdp needs torch>=2\.6 \(installed: 2\.5\.1\+cpu\)"):
        runtime.require_torch((2, 6), "--fsdp", version="2.5.1+cpu")
    runtime.require_torch((2, 6), "--fsdp", version="2.13.0")
    model = torch.nn.Linear(3, 3)
    model.weight.requires_grad_(True)
    cfg = TrainConfig(learning_rate=1e-3, weight_decay=0.1, beta2=0.95)
    assert optim.configure_optimizer(model, cfg, torch.device("cpu")).defaults["fused"]
    monkeypatch.setattr(runtime, "torch_version", lambda: (2, 3))  # CPU fused AdamW arrived in 2.4
    opt = optim.configure_optimizer(model, cfg, torch.device("cpu"))
    assert not opt.defaults["fused"] and opt.defaults["foreach"]


def test_kernel_switch_turns_the_fast_paths_off(monkeypatch):
    x, w = torch.randn(6, 16), torch.randn(24, 16)
    fast = kernels.linear(x, w)
    monkeypatch.setenv(kernels.SWITCH, "0")
    assert not kernels.enabled() and not kernels.onednn()
    calls = []
    monkeypatch.setattr(kernels, "onednn_linear", lambda *a: calls.append(1))
    torch.testing.assert_close(kernels.linear(x, w), torch.nn.functional.linear(x, w))
    torch.testing.assert_close(fast, x @ w.t(), atol=1e-5, rtol=1e-5)
    assert calls == []


def test_a_process_ended_by_a_signal_is_named_by_rank():
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    killed = ProcessFailure(local_rank=1, pid=4321, exitcode=-9, error_file="")
    failed = ProcessFailure(local_rank=0, pid=4320, exitcode=2, error_file="")
    lines = runtime.lost_processes({3: killed, 2: failed})  # as ChildFailedError.failures: by global rank
    assert len(lines) == 1 and lines[0].startswith("rank 3 (local rank 1, pid 4321) was ended by SIGKILL")


def test_restarted_workers_on_several_nodes_need_their_own_store(monkeypatch):
    env = dict(WORLD_SIZE="2", GROUP_WORLD_SIZE="2", TORCHELASTIC_MAX_RESTARTS="1", TORCHELASTIC_RESTART_COUNT="1")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv(runtime.SHARED_STORE_OFF, raising=False)
    with pytest.raises(OptionError, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        runtime.job_restarted()


def test_workers_started_again_resume_the_newest_checkpoint(tmp_path, monkeypatch):
    from gptforge.train import state
    from gptforge.train.runfolder import resume_after_restart

    cfg = TrainConfig(out_dir=str(tmp_path), max_steps=2, overwrite=True)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert resume_after_restart(cfg) == cfg  # no checkpoint yet: as given (here: start again)
    (tmp_path / "checkpoints" / "step-0000002").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-0000002" / state.STATE_NAME).write_bytes(b"")
    again = resume_after_restart(cfg)
    assert again.resume and not again.overwrite
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert resume_after_restart(cfg) == cfg  # the first attempt does what the command says
