"""The choice of CPU paths by measurement (calibrate.py): a stored decision is used, the environment's
override wins, a corrupt file is measured again, and each decision steers its path. Never timings."""

from __future__ import annotations

import json

import pytest
import torch
from test_native import needs_kernel

from gptforge import GPT, calibrate, cpu, gelu, kernels, runtime
from gptforge.config import GPTConfig
from gptforge.errors import OptionError
from gptforge.inference import fastdecode, native, packed
from gptforge.inference.quantize import quantize_model

STORED = {"onednn": True, "bf16": True, "gelu": True, "prefetch": True, "fp32_rows": 5, "int8_rows": 2, "threads": 1}


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """A fresh cache folder, no override, and measurements that count their calls and give STORED's opposite."""
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path))
    monkeypatch.delenv(calibrate.OVERRIDE, raising=False)
    calls = []
    monkeypatch.setitem(calibrate.MEASURES, "products", lambda: calls.append("products") or ({"onednn": False}, {}))
    monkeypatch.setitem(calibrate.MEASURES, "prefetch", lambda: calls.append("prefetch") or ({"prefetch": False}, {}))
    monkeypatch.setitem(calibrate.MEASURES, "bf16", lambda: calls.append("bf16") or ({"bf16": False}, {}))
    monkeypatch.setitem(calibrate.MEASURES, "gelu", lambda: calls.append("gelu") or ({"gelu": False}, {}))
    monkeypatch.setitem(
        calibrate.MEASURES,
        "steps",
        lambda: calls.append("steps") or ({"fp32_rows": 8, "int8_rows": 0, "threads": 2}, {"fp32_step_ms": {}}),
    )
    calibrate.forget()
    yield calls
    calibrate.forget()


def _store(decisions) -> None:
    calibrate.path().parent.mkdir(parents=True, exist_ok=True)
    calibrate.path().write_text(json.dumps({"decisions": decisions}))


def test_a_stored_decision_is_used_without_measuring(machine):
    _store(STORED)
    assert {name: calibrate.decision(name) for name in STORED} == STORED
    assert machine == []


def test_first_use_measures_once_and_stores_per_group(machine):
    assert calibrate.decision("fp32_rows") == 8 and calibrate.decision("threads") == 2
    assert machine == ["steps"]  # one measurement for the group's three decisions
    stored = json.loads(calibrate.path().read_text())
    assert stored["decisions"] == {"fp32_rows": 8, "int8_rows": 0, "threads": 2} and stored["isa"] == cpu.isa()
    calibrate.forget()  # a new process: read from the file
    assert calibrate.decision("int8_rows") == 0 and machine == ["steps"]
    assert calibrate.decision("onednn") is False and machine == ["steps", "products"]


@pytest.mark.parametrize("corrupt", ["{not json", json.dumps({"decisions": {"fp32_rows": 99}}), json.dumps([1])])
def test_a_corrupt_file_is_measured_again(machine, corrupt):
    calibrate.path().parent.mkdir(parents=True, exist_ok=True)
    calibrate.path().write_text(corrupt)
    assert calibrate.decision("fp32_rows") == 8 and machine == ["steps"]
    assert json.loads(calibrate.path().read_text())["decisions"]["fp32_rows"] == 8


def test_the_override_wins(machine, monkeypatch):
    _store(STORED)
    monkeypatch.setenv(calibrate.OVERRIDE, "onednn=0, fp32_rows=2")
    assert calibrate.decision("onednn") is False and calibrate.decision("fp32_rows") == 2
    assert calibrate.decision("threads") == STORED["threads"]  # not overridden: stored
    monkeypatch.setenv(calibrate.OVERRIDE, "off")
    assert {name: calibrate.decision(name) for name in STORED} == calibrate.DEFAULTS
    assert machine == []


@pytest.mark.parametrize(
    "text", ["fast=1", "fp32_rows=9", "threads=-1", "int8_rows", "onednn=maybe", "prefetch=2", "bf16=fast"]
)
def test_a_bad_override_is_refused_by_name(machine, monkeypatch, text):
    monkeypatch.setenv(calibrate.OVERRIDE, text)
    with pytest.raises(OptionError, match=f"GPTFORGE_CALIBRATION: '{text}' is not one of"):
        calibrate.decision("fp32_rows")


def test_the_isa_level_and_torchs_isa_variables_have_files_of_their_own(machine, monkeypatch):
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.setenv(cpu.ISA, "native")
    files = {calibrate.path()}
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    files.add(calibrate.path())
    monkeypatch.setenv(cpu.ISA, "avx2")
    files.add(calibrate.path())
    assert len(files) == 3 and all(f.parent == calibrate.path().parent for f in files)


@needs_kernel
def test_the_decisions_steer_the_paths(machine, monkeypatch):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=2)).eval()
    monkeypatch.setenv(calibrate.OVERRIDE, "fp32_rows=2,int8_rows=0,threads=1,prefetch=0")
    assert fastdecode.decoder(model, 2) is not None and fastdecode.decoder(model, 3) is None
    assert not fastdecode.Decoder(quantize_model(GPT(model.config).eval())).takes(1)
    seen, prefetch = [], []
    real, real_prefetch = native.step, native.set_prefetch
    monkeypatch.setattr(native, "step", lambda *a: seen.append(torch.get_num_threads()) or real(*a))
    monkeypatch.setattr(native, "set_prefetch", lambda on: prefetch.append(on) or real_prefetch(on))
    before = torch.get_num_threads()
    cache = model.new_cache(1, 8)
    with torch.no_grad():
        fastdecode.decoder(model, 1)(torch.tensor([3]), torch.tensor([[0]]), cache)
    assert seen == [1] and torch.get_num_threads() == before and prefetch == [False]
    monkeypatch.setenv(calibrate.OVERRIDE, "prefetch=1")
    with packed.cpu_inference_weights(model):  # the products of other decoding paths (LoRA, beams) too
        assert prefetch == [False, True]
    for flag in ("0", "1"):
        monkeypatch.setenv(calibrate.OVERRIDE, f"onednn={flag},bf16={flag}")
        assert kernels.onednn() == (flag == "1" and kernels._onednn_checked())
        for precision in ("auto", "fp32", "bf16"):  # only auto takes bf16 products, and only on the CPU
            on = runtime.cpu_bf16_products(precision, torch.device("cpu"))
            assert on == (flag == "1" and precision == "auto")
        assert not runtime.cpu_bf16_products("auto", torch.device("cuda"))


@pytest.mark.slow
@needs_kernel
def test_the_real_measurements_give_valid_decisions(monkeypatch, tmp_path):
    """Both measurements run on this machine and give decisions of the right kinds (which ones: its business)."""
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path))
    decisions, timings = fastdecode.measure_steps()
    assert set(decisions) == {"fp32_rows", "int8_rows", "threads"} and "fp32_step_ms" in timings
    assert all(calibrate._valid(name, value) for name, value in decisions.items())
    decisions, timings = native.measure_prefetch()
    assert isinstance(decisions["prefetch"], bool) and set(timings["prefetch_ms"]) == {"on", "off"}
    products, _ = calibrate.compare_products(lambda a, b: a @ b)
    assert isinstance(products["onednn"], bool)
    bf16, timings = calibrate.compare_bf16(kernels.bf16_matmul)
    assert isinstance(bf16["bf16"], bool) and set(timings["bf16_products_ms"]) == {"fp32", "bf16"}
    wrong, _ = calibrate.compare_bf16(lambda a, b: (a @ b) * 1.1)  # fast but not a product of rounded inputs
    assert wrong == {"bf16": False}
    decisions, timings = gelu.measure()
    assert isinstance(decisions["gelu"], bool) and set(timings["gelu_ms"]) == {"torch", "c"}


def test_info_shows_the_machine_and_its_decisions(machine, monkeypatch, capsys):
    from gptforge.cli import main

    _store({"fp32_rows": 5})
    monkeypatch.setenv(calibrate.OVERRIDE, "threads=1")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"instruction set: {cpu.isa()} (GPTFORGE_ISA" in out and f"calibration: {calibrate.path()}" in out
    assert "fp32_rows = 5 (measured" in out and "threads = 1 (from GPTFORGE_CALIBRATION)" in out
    assert "onednn: not measured yet" in out and machine == []  # info alone measures nothing
    monkeypatch.delenv(calibrate.OVERRIDE)
    assert main(["info", "--calibrate"]) == 0
    out = capsys.readouterr().out
    assert sorted(machine) == ["bf16", "gelu", "prefetch", "products", "steps"] and "onednn = False (measured" in out
    assert "threads = 2" in out and "prefetch = False (measured" in out


def test_another_path_wins_only_by_more_than_the_noise():
    quiet = {"c": [1.00, 1.01, 1.05], "torch": [0.90, 0.91, 0.95]}
    assert calibrate.beats(quiet, "torch", "c") and not calibrate.beats(quiet, "c", "torch")
    assert not calibrate.beats({"c": [1.00, 1.01], "torch": [0.98, 0.99]}, "torch", "c")  # within 3%
    busy = {"c": [1.00, 1.60], "torch": [0.70, 0.75]}  # the default's two best 60% apart: a chance winner
    assert not calibrate.beats(busy, "torch", "c")
