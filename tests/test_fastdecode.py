"""The decoding step in C (fastdecode.py, csrc/decode.c): the model's logits and KV cache, the same tokens as
the torch path through padding, a sliding window and int8 weights, and the torch path wherever it does not
apply."""

from __future__ import annotations

import copy

import pytest
import test_native
import torch
from test_native import needs_kernel
from torch import nn

from gptforge import GPT, cpu, kernels
from gptforge import batching as generate_module
from gptforge.adapters import apply_lora
from gptforge.config import GPTConfig
from gptforge.generate import generate_ids
from gptforge.inference import fastdecode, int8, native, packed
from gptforge.inference.quantize import quantize_model

pytestmark = needs_kernel
level = test_native.level  # the fixture: a test using it runs at each instruction-set level this CPU can run
_c_step_at_every_row = test_native._c_step_at_every_row  # autouse: the C step for 1-8 rows, 3 int8


def _model(activation="gelu_new", n_embd=40, seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(
        vocab_size=300, n_positions=48, n_embd=n_embd, n_layer=2, n_head=4, activation_function=activation, **kw
    )
    model = GPT(cfg).eval()
    with torch.no_grad():  # LayerNorms and biases away from their 1 / 0 start, so that the test sees them
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _prefilled(model: GPT, prompt: torch.Tensor, max_len: int = 30):
    cache = model.new_cache(prompt.size(0), max_len)
    with torch.inference_mode():
        model(prompt, cache=cache)
    return cache


def _chain(model: GPT, past: int) -> int:
    """How many roundings in a row may reach a logit: per block two layer norms (mean, variance), the qkv
    product, a query's scores and its weighted sum over past + 1 positions, the output, fc and projection
    products; then the final layer norm and the head, and a few more for biases, scales and activations."""
    c = model.config
    block = 4 * c.n_embd + c.n_embd + c.head_dim + past + 1 + c.n_embd + c.n_embd + c.mlp_width + 8
    return c.n_layer * block + 3 * c.n_embd + 8


def _in_float64(model: GPT, cache, nxt, pos, visible=None):
    """The step in float64 from a copy of `cache`: logits, the cache, and for each linear layer the bound
    (native.rounding_bound over the whole chain) on how far an fp32 step's output may be from it."""
    ref = copy.deepcopy(model).double()
    chain = _chain(model, cache.length)
    bounds, handles = {}, []
    for name, layer in ref.named_modules():
        if isinstance(layer, nn.Linear):

            def keep(mod, inp, out, name=name):
                x = inp[0].reshape(-1, inp[0].shape[-1])
                bounds[name] = native.rounding_bound(x, mod.weight, chain - x.shape[-1])

            handles.append(layer.register_forward_hook(keep))
    cache64 = ref.new_cache(nxt.numel(), cache.max_len)
    cache64.k, cache64.v = [k.double() for k in cache.k], [v.double() for v in cache.v]
    cache64.length = cache.length
    with torch.inference_mode():
        logits, _ = ref(nxt[:, None], cache=cache64, position_ids=pos, attention_mask=visible)
    for h in handles:
        h.remove()
    return logits[:, -1], cache64, bounds


def _assert_within(got, want, bound):
    err = (got.double() - want).abs()
    assert (err <= bound).all(), f"off by {float(err.max()):.3g}, {float((err / bound).max()):.3g}x the bound"


def _assert_step_close(model: GPT, logits, cache, reference):
    """logits and the cache's new position within the float64 reference's bounds (the rest unchanged)."""
    want, cache64, bounds = reference
    _assert_within(logits, want, bounds["lm_head"])
    new = cache.length - 1
    for i, (k, v) in enumerate(zip(cache.k, cache.v)):
        qkv = bounds[f"transformer.h.{i}.attn.c_attn"].view(k.size(0), 3, model.config.n_head, -1)
        _assert_within(k[:, :, new], cache64.k[i][:, :, new], qkv[:, 1])
        _assert_within(v[:, :, new], cache64.v[i][:, :, new], qkv[:, 2])
        assert torch.equal(k[:, :, :new].double(), cache64.k[i][:, :, :new])


@pytest.mark.parametrize("activation", sorted(native.ACTIVATIONS))
@pytest.mark.parametrize("n_embd", [40, 64])  # 40: rows padded to whole vectors in the C code
@pytest.mark.usefixtures("level")
def test_step_gives_the_models_logits_and_cache(activation, n_embd):
    model = _model(activation, n_embd)
    prompt, nxt = torch.randint(0, 300, (3, 7)), torch.randint(0, 300, (3,))
    pos = torch.full((3, 1), 7)
    ours, theirs = _prefilled(model, prompt), _prefilled(model, prompt)
    reference = _in_float64(model, ours, nxt, pos)
    with torch.inference_mode():
        want, _ = model(nxt[:, None], cache=theirs, position_ids=pos)
        got = fastdecode.decoder(model, 3)(nxt, pos, ours)
    assert ours.length == theirs.length == 8
    _assert_step_close(model, got, ours, reference)
    _assert_step_close(model, want[:, -1], theirs, reference)  # torch's fp32 step keeps the same bound


@pytest.mark.usefixtures("level")
def test_step_masks_padding():
    model = _model()
    prompt, nxt = torch.randint(0, 300, (2, 6)), torch.tensor([5, 9])
    visible = torch.ones(2, 7, dtype=torch.bool)
    visible[0, :3] = False  # row 0's first three positions are padding
    ours = _prefilled(model, prompt)
    pos = torch.tensor([[3], [6]])
    reference = _in_float64(model, ours, nxt, pos, visible)
    with torch.inference_mode():
        got = fastdecode.decoder(model, 2)(nxt, pos, ours, visible)
        unmasked = fastdecode.decoder(model, 2)(nxt, pos, _prefilled(model, prompt))
    _assert_step_close(model, got, ours, reference)
    assert not torch.allclose(unmasked[0], got[0], atol=1e-3)  # the mask changed row 0
    _assert_within(unmasked[1], reference[0][1], reference[2]["lm_head"][1])


def _both_paths(model, prompts, monkeypatch, **options):
    """generate_ids' tokens with the C step and with the torch path, and how many C steps ran."""
    calls = []
    real = native.step
    monkeypatch.setattr(native, "step", lambda *a: calls.append(1) or real(*a))
    ours = generate_ids(model, prompts, eos_id=None, **options)
    in_c = len(calls)
    monkeypatch.setattr(generate_module, "decoder", lambda model, rows: None)
    theirs = generate_ids(model, prompts, eos_id=None, **options)
    assert len(calls) == in_c  # the second run went through torch
    return ours, theirs, in_c


@pytest.mark.parametrize("sampling", [{"do_sample": False}, {"do_sample": True, "seed": 3, "top_k": 20}])
def test_generate_uses_the_step_and_gives_the_same_tokens(monkeypatch, sampling):
    model = _model(seed=1)
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11]]  # left-padded to one batch
    ours, theirs, calls = _both_paths(model, prompts, monkeypatch, max_new_tokens=12, **sampling)
    assert calls == 11 and ours == theirs and all(len(row) == 12 for row in ours)


def test_sliding_window_goes_on_in_c(monkeypatch):
    model = _model(seed=2)  # context of 48 tokens: 60 new tokens slide the window
    ours, theirs, calls = _both_paths(model, [list(range(20))], monkeypatch, max_new_tokens=60, do_sample=False)
    assert ours == theirs and 40 < calls < 59


@pytest.mark.usefixtures("level")
def test_int8_model_uses_its_int8_weights():
    """The C step on int8 weights gives the step of their fp32 values times the scales. Both start from the
    same cache: a prompt through the int8 model goes through fbgemm, which rounds each input to 8 bits, or
    to 7 on processors without VNNI (the AVX2 ones), and so is another computation, not a rounding of this one."""
    model = _model(seed=4)
    plain = _model(seed=4)  # the same weights, replaced by what the int8 ones stand for
    quantize_model(model)
    with torch.no_grad():
        for (name, layer), twin in zip(model.named_modules(), plain.modules()):
            if isinstance(layer, int8.Int8Linear):
                twin.weight = nn.Parameter(layer.weight.float() * layer.scale[:, None])
    prompt, nxt, pos = torch.randint(0, 300, (2, 5)), torch.tensor([3, 4]), torch.full((2, 1), 5)
    cache = _prefilled(plain, prompt)
    reference = _in_float64(plain, cache, nxt, pos)
    with torch.inference_mode():
        got = fastdecode.decoder(model, 2)(nxt, pos, cache)
    _assert_step_close(plain, got, cache, reference)


def test_torch_path_where_the_step_does_not_apply(monkeypatch):
    model = _model()
    assert fastdecode.decoder(model, cpu.MAX_ROWS + 1) is None  # a big batch: torch's GEMMs
    assert not any(packed.is_packed(m) for m in model.modules() if isinstance(m, nn.Linear))  # nothing packed for it
    assert fastdecode.decoder(model, cpu.MAX_ROWS) is not None
    model.train()
    assert not fastdecode.applies(model)
    model.eval()
    monkeypatch.setenv(kernels.SWITCH, "0")
    assert not fastdecode.applies(model)
    monkeypatch.delenv(kernels.SWITCH)
    lora = _model()
    apply_lora(lora, r=2)
    assert not fastdecode.applies(lora)  # adapters: their own forward
    assert not fastdecode.applies(_model().double())
    int8 = fastdecode.Decoder(quantize_model(_model()))
    assert int8.takes(3) and not int8.takes(4)  # int8_rows=3 (_c_step_at_every_row)


def test_bad_positions_and_ids_are_refused():
    model = _model()
    step = fastdecode.decoder(model, 1)
    cache = _prefilled(model, torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match="beyond the context"):
        step(torch.tensor([1]), torch.tensor([[48]]), cache)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 300\)"):
        step(torch.tensor([300]), torch.tensor([[3]]), cache)
    with pytest.raises(ValueError, match="takes 1 to 8 rows, not 9"):
        step(torch.ones(9, dtype=torch.long), torch.full((9, 1), 3), cache)
    with pytest.raises(ValueError, match="a row per sequence"):
        step(torch.tensor([1, 2]), torch.tensor([[3], [3]]), cache)  # a cache of one row
    with pytest.raises(ValueError, match="a row per sequence"):
        step(torch.tensor([1]), torch.tensor([[3]]), _prefilled(_model(n_embd=64), torch.tensor([[1, 2, 3]])))
    with pytest.raises(ValueError, match="2 positions for 1 token ids"):
        step(torch.tensor([1]), torch.tensor([[3], [4]]), cache)
    with pytest.raises(ValueError, match="visible must be"):
        step(torch.tensor([1]), torch.tensor([[3]]), cache, torch.ones(1, 9, dtype=torch.bool))
    assert cache.length == 3  # nothing was written
