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
