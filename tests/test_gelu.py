"""GPT-2's tanh GELU in C (gelu.py, csrc/gelu.c): torch's values and gradients at every instruction-set level this
processor runs, used only where calibration chose it, and torch's GELU wherever the C one cannot be."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from gptforge import GPT, calibrate, cpu, gelu, kernels
from gptforge.config import GPTConfig

needs_compiler = pytest.mark.skipif(
    not (shutil.which("cc") or shutil.which("gcc")) or not cpu.supported(),
    reason="the C GELU needs a C compiler on Linux or macOS, x86-64 or ARM64",
)


@pytest.fixture(params=["native", *cpu.LEVELS])
def level(request, monkeypatch):
    """The C GELU built for this instruction-set level (GPTFORGE_ISA), chosen by calibration's override."""
    if not cpu.runs_here(request.param):
        pytest.skip(f"this processor cannot run code built for {request.param}")
    monkeypatch.setenv(cpu.ISA, request.param)
    monkeypatch.setenv(calibrate.OVERRIDE, "gelu=1")
    return request.param


@needs_compiler
def test_the_c_gelu_gives_torchs_values_and_gradients(level):
    assert gelu.available()
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(4998, generator=g) * 3, torch.tensor([0.0, -0.0, 30.0, -30.0, 1e-20, -9.5, 88.0])])
    x = x.reshape(-1, 5).requires_grad_()
    gy = torch.randn(x.shape, generator=g)
    ours, ref = kernels.gelu_tanh(x), F.gelu(x, approximate="tanh")
    assert ours.grad_fn is not None and "GeluTanh" in type(ours.grad_fn).__name__  # the C path ran
    # float rounding of a different but equal formula (gelu.rounding: where torch's 1 + tanh loses its bits)
    assert_gelu_close(ours, ref, gelu.rounding(x))
    assert_gelu_close(torch.autograd.grad(ours, x, gy)[0], torch.autograd.grad(ref, x, gy)[0], gelu.rounding(x, gy))


def assert_gelu_close(ours: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> None:
    gap = (ours - ref).abs() - (bound + 4e-7 * ref.abs())
    assert (gap <= 0).all(), f"{int((gap > 0).sum())} values off by up to {gap.max().item():.2e} beyond rounding"


@needs_compiler
def test_a_model_with_the_c_gelu_trains_like_one_with_torchs(monkeypatch):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, n_positions=16, n_embd=32, n_layer=2, n_head=4)).eval()
    x = torch.randint(0, 97, (3, 10))

    def grads(flag: str):
        monkeypatch.setenv(calibrate.OVERRIDE, f"gelu={flag}")
        calls = []
        real = gelu.forward
        monkeypatch.setattr(gelu, "forward", lambda t: calls.append(1) or real(t))
        model.zero_grad()
        loss = model(x, targets=x)[1]
        loss.backward()
        return calls, loss.detach(), [p.grad.clone() for p in model.parameters()]

    (c_calls, c_loss, c_grads), (t_calls, t_loss, t_grads) = grads("1"), grads("0")
    assert len(c_calls) == 2 and t_calls == []  # one per block with the C GELU, none without
    torch.testing.assert_close(c_loss, t_loss, atol=1e-5, rtol=1e-5)
    for a, b in zip(c_grads, t_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_without_the_c_gelu_torchs_is_used(monkeypatch):
    monkeypatch.setenv(calibrate.OVERRIDE, "gelu=1")
    monkeypatch.setattr(gelu, "available", lambda: False)
    x = torch.randn(4, 8, requires_grad=True)
    y = kernels.gelu_tanh(x)
    assert "GeluTanh" not in type(y.grad_fn).__name__
    torch.testing.assert_close(y, F.gelu(x, approximate="tanh"))
    assert gelu.measure() == ({"gelu": False}, {})  # nothing to measure: torch's


@needs_compiler
def test_a_c_gelu_that_disagrees_is_not_used(monkeypatch, tmp_path):
    """A build whose values are off (here: a source with a wrong constant) is refused with a warning."""
    wrong = tmp_path / "gelu.c"
    wrong.write_text(cpu.GELU_SOURCE.read_text().replace("0.044715f", "0.05f"))
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu, "GELU_SOURCE", wrong)
    gelu._load.cache_clear()
    try:
        with pytest.warns(UserWarning, match="GELU disagrees with torch's"):
            assert gelu._load(cpu.isa()) is None
    finally:
        gelu._load.cache_clear()


@pytest.mark.skipif(not cpu.supported(), reason="the C GELU is built only on Linux and macOS, x86-64 or ARM64")
def test_without_a_compiler_torchs_gelu_remains(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu.shutil, "which", lambda name: None)
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path))
    monkeypatch.setenv(calibrate.OVERRIDE, "gelu=1")
    gelu._load.cache_clear()
    try:
        with pytest.warns(UserWarning, match="GELU could not be built"):
            assert not gelu.available()
        x = torch.randn(3, 5, requires_grad=True)
        torch.testing.assert_close(kernels.gelu_tanh(x), F.gelu(x, approximate="tanh"))
    finally:
        gelu._load.cache_clear()
