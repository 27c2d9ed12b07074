"""The decoding step in C (fastdecode.py, csrc/decode.c): the model's logits and KV cache, the same tokens as
the torch path through padding, a sliding window and int8 weights, and the torch path wherever it does not
apply."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from gptforge import GPT, fastdecode, kernels, native
from gptforge import batching as generate_module
from gptforge.adapters import apply_lora
from gptforge.config import GPTConfig
from gptforge.generate import generate_ids
from gptforge.quantize import quantize_model

from test_native import needs_kernel

pytestmark = needs_kernel


def _model(activation="gelu_new", n_embd=40, seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=300, n_positions=48, n_embd=n_embd, n_layer=2, n_head=4,
                    activation_function=activation, **kw)
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


@pytest.mark.parametrize("activation", sorted(native.ACTIVATIONS))
@pytest.mark.parametrize("n_embd", [40, 64])  # 40: rows padded to whole vectors in the C code
def test_step_gives_the_models_logits_and_cache(activation, n_embd):
    model = _model(activation, n_embd)
    prompt, nxt = torch.randint(0, 300, (3, 7)), torch.randint(0, 300, (3,))
    pos = torch.full((3, 1), 7)
    ours, theirs = _prefilled(model, prompt), _prefilled(model, prompt)
    with torch.inference_mode():
        want, _ = model(nxt[:, None], cache=theirs, position_ids=pos)
        got = fastdecode.decoder(model, 3)(nxt, pos, ours)
    torch.testing.assert_close(got, want[:, -1], atol=2e-5, rtol=1e-4)
    assert ours.length == theirs.length == 8
    for a, b in zip(ours.k + ours.v, theirs.k + theirs.v):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_step_masks_padding():
    model = _model()
    prompt, nxt = torch.randint(0, 300, (2, 6)), torch.tensor([5, 9])
    visible = torch.ones(2, 7, dtype=torch.bool)
    visible[0, :3] = False  # row 0's first three positions are padding
    ours, theirs = _prefilled(model, prompt), _prefilled(model, prompt)
    pos = torch.tensor([[3], [6]])
    with torch.inference_mode():
        want, _ = model(nxt[:, None], cache=theirs, position_ids=pos, attention_mask=visible)
        got = fastdecode.decoder(model, 2)(nxt, pos, ours, visible)
        unmasked = fastdecode.decoder(model, 2)(nxt, pos, _prefilled(model, prompt))
    torch.testing.assert_close(got, want[:, -1], atol=2e-5, rtol=1e-4)
    assert not torch.allclose(unmasked[0], got[0], atol=1e-3)  # the mask changed row 0
    torch.testing.assert_close(unmasked[1], got[1], atol=2e-5, rtol=1e-4)


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


def test_int8_model_uses_its_int8_weights(monkeypatch):
    model = _model(seed=4)
    plain = _model(seed=4)  # the same weights, replaced by what the int8 ones stand for
    quantize_model(model)
    with torch.no_grad():
        for (name, layer), twin in zip(model.named_modules(), plain.modules()):
            if isinstance(layer, kernels.Int8Linear):
                twin.weight = nn.Parameter(layer.weight.float() * layer.scale[:, None])
    prompt, nxt, pos = torch.randint(0, 300, (2, 5)), torch.tensor([3, 4]), torch.full((2, 1), 5)
    with torch.inference_mode():
        got = fastdecode.decoder(model, 2)(nxt, pos, _prefilled(model, prompt))
        want, _ = plain(nxt[:, None], cache=_prefilled(plain, prompt), position_ids=pos)
    torch.testing.assert_close(got, want[:, -1], atol=1e-4, rtol=1e-4)


def test_torch_path_where_the_step_does_not_apply(monkeypatch):
    model = _model()
    assert fastdecode.decoder(model, native.MAX_ROWS + 1) is None  # a big batch: torch's GEMMs
    assert not any(kernels.is_packed(m) for m in model.modules() if isinstance(m, nn.Linear))  # nothing packed for it
    assert fastdecode.decoder(model, native.MAX_ROWS) is not None
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
    assert int8.takes(fastdecode.INT8_ROWS) and not int8.takes(fastdecode.INT8_ROWS + 1)


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
