"""The decoding kernel built for ARM64 (csrc/decode.c with NEON) and run under qemu-user: the same step and
products as torch computes here, within float32's rounding bounds. Needs Debian's gcc-aarch64-linux-gnu and
qemu-user; skipped without them. Speed on ARM is not measured here."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from test_fastdecode import _assert_within, _in_float64, _model, _prefilled
from test_gelu import assert_gelu_close
from test_native import assert_product_close

from gptforge import cpu, gelu
from gptforge.inference import native

CROSS, QEMU = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CROSS and QEMU),
        reason="needs gcc-aarch64-linux-gnu and qemu-user (apt-get install gcc-aarch64-linux-gnu qemu-user)",
    ),
]
DRIVER = Path(__file__).with_name("csrc") / "step_driver.c"


def _write(f, a) -> None:
    data = b"" if a is None else np.ascontiguousarray(a.detach().numpy() if torch.is_tensor(a) else a).tobytes()
    f.write(np.int64(len(data)).tobytes() + data)


def _weight(f, layer, width: int) -> None:
    packed = native.pack(layer.weight, vector=width)
    _write(f, packed.data)
    _write(f, layer.bias)


def _padded(t: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, -t.size(-1) % width))


def _inputs(path: Path, model, cache, nxt, pos, x, w, q, scale, width: int) -> None:
    """The driver's input, packed for a build that reads vectors of `width` values (not this machine's)."""
    c, tr = model.config, model.transformer
    with path.open("wb") as f:
        _write(
            f,
            np.array(
                [
                    c.n_layer,
                    c.n_head,
                    c.n_embd,
                    c.mlp_width,
                    cache.max_len,
                    native.ACTIVATIONS[c.activation_function],
                    nxt.numel(),
                    cache.length,
                    c.vocab_size,
                    x.size(0),
                    w.size(0),
                    _padded(x, width).size(1),
                ],
                dtype=np.int64,
            ),
        )
        _write(f, np.array([c.layer_norm_epsilon], dtype=np.float32))
        _write(f, nxt.long()), _write(f, pos.reshape(-1).long())
        for t in (tr.wte.weight, tr.wpe.weight, tr.ln_f.weight, tr.ln_f.bias):
            _write(f, t)
        _weight(f, model.lm_head, width)
        for b, k, v in zip(tr.h, cache.k, cache.v):
            _write(f, b.ln_1.weight), _write(f, b.ln_1.bias)
            _weight(f, b.attn.c_attn, width), _weight(f, b.attn.c_proj, width)
            _write(f, b.ln_2.weight), _write(f, b.ln_2.bias)
            _weight(f, b.mlp.c_fc, width), _weight(f, b.mlp.c_proj, width)
            _write(f, k), _write(f, v)
        _write(f, native.pack(w, vector=width).data), _write(f, None)
        _write(f, native.pack_int8(q, scale, vector=width).data), _write(f, None), _write(f, scale)
        _write(f, _padded(x, width))


def test_the_kernel_built_for_arm64_gives_the_step_and_products(tmp_path):
    program = tmp_path / "driver"
    flags = [*cpu.FLAGS, "-march=armv8-a", "-static", f"-I{cpu.SOURCE.parent}"]
    subprocess.run([CROSS, *flags, str(DRIVER), "-o", str(program), "-lm"], check=True, capture_output=True)
    width = int(subprocess.run([QEMU, str(program), "width"], check=True, capture_output=True, text=True).stdout)
    assert width == 4  # NEON's 128-bit registers (csrc/decode.c's W): the layout packed below
    model = _model(n_embd=40)
    prompt, nxt, pos = torch.randint(0, 300, (3, 7)), torch.randint(0, 300, (3,)), torch.full((3, 1), 7)
    cache = _prefilled(model, prompt)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 45, generator=g), torch.randn(37, 45, generator=g)
    q, scale = torch.randint(-127, 128, (37, 45), generator=g, dtype=torch.int8), torch.rand(37, generator=g) / 50
    _inputs(tmp_path / "in.bin", model, cache, nxt, pos, x, w, q, scale, width)
    subprocess.run([QEMU, str(program), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")], check=True, timeout=300)
    out = torch.from_numpy(np.fromfile(tmp_path / "out.bin", dtype=np.float32))
    want, cache64, bounds = _in_float64(model, cache, nxt, pos)
    logits, out = out[: want.numel()].view(want.shape), out[want.numel() :]
    _assert_within(logits, want, bounds["lm_head"])
    new, size = cache.length, cache.k[0].numel()
    for i in range(model.config.n_layer):
        k, v, out = out[:size].view(cache.k[i].shape), out[size : 2 * size].view(cache.k[i].shape), out[2 * size :]
        qkv = bounds[f"transformer.h.{i}.attn.c_attn"].view(3, 3, model.config.n_head, -1)
        _assert_within(k[:, :, new], cache64.k[i][:, :, new], qkv[:, 1])
        _assert_within(v[:, :, new], cache64.v[i][:, :, new], qkv[:, 2])
    assert_product_close(out[: 37 * 3].view(3, 37), x, w)
    assert_product_close(out[37 * 3 :].view(3, 37), x, q.float() * scale[:, None])


def test_the_gelu_built_for_arm64_gives_torchs_values_and_gradients(tmp_path):
    program = tmp_path / "gelu"
    flags = [*cpu.FLAGS, "-march=armv8-a", "-static"]
    sources = [str(Path(__file__).with_name("csrc") / "gelu_driver.c"), str(cpu.GELU_SOURCE)]
    subprocess.run([CROSS, *flags, *sources, "-o", str(program), "-lm"], check=True, capture_output=True)
    g = torch.Generator().manual_seed(0)
    x, grad = torch.randn(40_001, generator=g) * 4, torch.randn(40_001, generator=g)  # several blocks of csrc/gelu.c
    with (tmp_path / "in.bin").open("wb") as f:
        f.write(np.int64(x.numel()).tobytes() + x.numpy().tobytes() + grad.numpy().tobytes())
    subprocess.run([QEMU, str(program), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")], check=True, timeout=300)
    out = torch.from_numpy(np.fromfile(tmp_path / "out.bin", dtype=np.float32))
    want = torch.nn.functional.gelu(x, approximate="tanh")
    want_dx = torch.ops.aten.gelu_backward(grad, x, approximate="tanh")
    assert_gelu_close(out[: x.numel()], want, gelu.rounding(x))
    assert_gelu_close(out[x.numel() :], want_dx, gelu.rounding(x, grad))
