"""The decoding kernel (native.gemv): F.linear's numbers, used for a decoding step's few rows, and torch's
products wherever it cannot be built."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from gptforge import GPT, calibrate, cpu, kernels, preset
from gptforge import batching as generate_module
from gptforge.errors import OptionError
from gptforge.generate import generate_ids
from gptforge.inference import native

needs_kernel = pytest.mark.skipif(
    not (shutil.which("cc") or shutil.which("gcc")) or not native.available(),
    reason="the decoding kernel needs a C compiler on Linux or macOS, x86-64 or ARM64",
)


@pytest.fixture(autouse=True)
def _c_step_at_every_row(monkeypatch):
    """The C step for 1-8 rows (3 int8) on torch's threads, whatever this machine measured: these tests check
    its numbers."""
    monkeypatch.setenv(calibrate.OVERRIDE, f"fp32_rows={cpu.MAX_ROWS},int8_rows=3,threads=0")


# every level the kernel can be built for; a test taking `level` runs at each this processor can run
LEVELS = ["native", *cpu.LEVELS]


@pytest.fixture(params=LEVELS)
def level(request, monkeypatch):
    """The kernel built for this instruction-set level (GPTFORGE_ISA) for the test's duration."""
    if not cpu.runs_here(request.param):
        pytest.skip(f"this processor cannot run code built for {request.param}")
    monkeypatch.setenv(cpu.ISA, request.param)
    if not native.available():
        pytest.skip(f"the kernel could not be built for {request.param} here")
    return request.param


def assert_product_close(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None):
    """got is x @ w.T (+ bias) up to rounding: within native.rounding_bound of F.linear's fp32 result."""
    want = F.linear(x, w, bias)
    err = (got.double() - want.double()).abs().reshape(-1, w.size(0))
    bound = native.rounding_bound(x.reshape(-1, x.size(-1)), w)
    assert (err <= bound).all(), f"off by {float(err.max()):.3g}, {float((err / bound).max()):.3g}x the bound"


@needs_kernel
def test_each_level_packs_for_its_own_vectors(level, monkeypatch):
    """AVX2 builds read 8-float vectors (wider ones went through memory), AVX-512 ones 16; a weight packed while
    one level is asked for is packed again for another (the packed copy is kept per layout)."""
    from gptforge.inference import packed

    width = native.vector_width()
    expected = {"avx2": 8, "avx512": 16}.get(level)
    assert width == (expected or width) and width in (8, 16)
    layer = torch.nn.Linear(40, 24)
    assert packed.decoding_weight(layer).width == -(-40 // width) * width
    other = "avx2" if width == 16 else "avx512"
    if cpu.runs_here(other):
        monkeypatch.setenv(cpu.ISA, other)
        assert packed.decoding_weight(layer).width == -(-40 // native.vector_width()) * native.vector_width()
        assert native.vector_width() != width


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_gemv_gives_linears_numbers(rows, level):
    g = torch.Generator().manual_seed(rows)
    # widths not a multiple of 4 or 16; the last weight is big enough for memory of its own (huge pages)
    for out, inp in ((1, 5), (7, 33), (64, 768), (1027, 96), (1501, 1000)):
        x, w, b = torch.randn(rows, inp, generator=g), torch.randn(out, inp, generator=g), torch.randn(out, generator=g)
        for bias, huge_pages in ((b, True), (None, True), (b, False)):  # 2 MB pages or torch's allocation
            packed = native.pack(w, huge_pages=huge_pages)
            assert_product_close(native.gemv(x, packed, bias), x, w, bias)
    wide = torch.randn(2, rows, 2 * 16, generator=g)[..., ::2]  # a strided input, batch dims kept
    w = torch.randn(9, 16, generator=g)
    got = native.gemv(wide, native.pack(w))
    assert got.shape == (2, rows, 9)
    assert_product_close(got, wide, w)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 4])
def test_prefetching_or_not_the_products_are_the_same(rows, level):
    """The calibration's `prefetch` changes which loads the kernel issues early, never a sum: same bits both ways."""
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 768, generator=g), torch.randn(3072, 768, generator=g)
    q, scale = torch.randint(-127, 128, (3072, 768), generator=g, dtype=torch.int8), torch.rand(3072, generator=g)
    got = {}
    for on in (False, True):
        native.set_prefetch(on)
        got[on] = native.gemv(x, native.pack(w)), native.gemv(x, native.pack_int8(q, scale))
    native.set_prefetch(True)
    assert all(torch.equal(a, b) for a, b in zip(got[False], got[True]))
    assert_product_close(got[True][0], x, w)


@needs_kernel
def test_fits_only_few_fp32_rows_without_gradients():
    w = torch.randn(8, 16)
    with torch.no_grad():
        assert native.fits(torch.randn(1, 1, 16), w) and native.fits(torch.randn(8, 16), w)
        assert not native.fits(torch.randn(9, 16), w)  # a prompt: torch's GEMM
        assert not native.fits(torch.randn(1, 16, dtype=torch.float64), w.double())
    assert not native.fits(torch.randn(1, 16), w)  # gradients wanted


@needs_kernel
@pytest.mark.parametrize("rows", [1, 4, 5])
def test_int8_gemv_gives_the_products_of_its_scaled_weights(rows, level):
    g = torch.Generator().manual_seed(rows)
    for out, inp in ((3, 7), (130, 96), (1501, 3000)):
        x, b = torch.randn(rows, inp, generator=g), torch.randn(out, generator=g)
        q, scale = (
            torch.randint(-127, 128, (out, inp), generator=g, dtype=torch.int8),
            torch.rand(out, generator=g) / 50,
        )
        for bias in (b, None):
            assert_product_close(native.gemv(x, native.pack_int8(q, scale), bias), x, q.float() * scale[:, None], bias)
    with pytest.raises(TypeError, match="int8 weight"):
        native.pack_int8(torch.randn(3, 4), torch.ones(3))


@needs_kernel
def test_decoding_steps_use_the_kernel_and_keep_the_tokens(monkeypatch):
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=300)).eval()
    prompt = torch.randint(0, 300, (2, 12))
    monkeypatch.setenv(kernels.SWITCH, "0")
    plain = generate_ids(model, prompt, max_new_tokens=10, do_sample=False, eos_id=None)
    monkeypatch.delenv(kernels.SWITCH)
    rows = []
    real = native.gemv
    monkeypatch.setattr(native, "gemv", lambda x, *a: rows.append(x.numel() // x.shape[-1]) or real(x, *a))
    in_c = generate_ids(model, prompt, max_new_tokens=10, do_sample=False, eos_id=None)
    assert in_c == plain and len(in_c[0]) == 10
    assert rows == [2]  # the prompt's head (its last position only); the steps ran in C (test_fastdecode.py)
    rows.clear()
    monkeypatch.setattr(generate_module, "decoder", lambda model, rows: None)  # the step through torch
    fast = generate_ids(model, prompt, max_new_tokens=10, do_sample=False, eos_id=None)
    assert fast == plain
    # every linear layer of the 9 decoding steps after the prompt (4 per block, and the head), and the prompt's
    # head, one row per sequence
    assert rows == [2] * (1 + 9 * (4 * 4 + 1))


@pytest.mark.skipif(not cpu.supported(), reason="the kernel is built only on Linux and macOS, x86-64 or ARM64")
def test_without_a_compiler_torch_products_remain(monkeypatch, tmp_path):
    native._load.cache_clear()
    try:
        monkeypatch.setattr(cpu.shutil, "which", lambda name: None)
        monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path))
        with pytest.warns(UserWarning, match="could not be built"):
            assert not native.available()
        assert not native.fits(torch.randn(1, 4), torch.randn(3, 4))
    finally:
        native._load.cache_clear()


def test_isa_level_is_checked_and_in_the_cache_key(monkeypatch):
    monkeypatch.setenv(cpu.ISA, "avx1024")
    with pytest.raises(OptionError, match="GPTFORGE_ISA='avx1024' is not an instruction-set level"):
        cpu.isa()
    monkeypatch.setenv(cpu.ISA, "AVX2")
    assert cpu.isa() == "avx2"
    assert len({cpu.build_key(level) for level in LEVELS}) == len(LEVELS)
    assert "-march=x86-64-v3" in cpu.build_flags("avx2")


@pytest.mark.skipif(not cpu.supported(), reason="the kernel is built only on Linux and macOS, x86-64 or ARM64")
def test_a_level_the_processor_lacks_keeps_torchs_products(monkeypatch):
    monkeypatch.setattr(cpu, "cpu_info", lambda field: "fpu sse2 avx" if field == "flags" else None)
    monkeypatch.setattr(cpu, "on_x86", lambda: True)
    monkeypatch.setenv(cpu.ISA, "avx512")
    native._load.cache_clear()
    try:
        with pytest.warns(UserWarning, match="GPTFORGE_ISA=avx512: this processor cannot run it"):
            assert not native.available()
    finally:
        native._load.cache_clear()


@needs_kernel
def test_without_openmp_it_builds_for_one_thread_with_one_warning(monkeypatch, tmp_path):
    """macOS: Apple's clang has no -fopenmp and torch ships no libgomp there."""
    monkeypatch.setattr(cpu, "torch_openmp", lambda: None)
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path))
    native._load.cache_clear()
    try:
        assert "-fopenmp" not in cpu.build_flags("native")
        with pytest.warns(UserWarning, match="without OpenMP") as warned:
            assert native.available()
        assert len(warned) == 1
        x, w = torch.randn(2, 40), torch.randn(9, 40)
        assert_product_close(native.gemv(x, native.pack(w)), x, w)
    finally:
        native._load.cache_clear()
