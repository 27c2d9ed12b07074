"""The network: KV cache, padded batches, loss and gradients against transformers, init, checkpointing, dropout."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import LazyTransformers

import gptforge.kernels as kernels
import gptforge.model as model_module
from gptforge import GPT, GPTConfig, preset
from gptforge.checkpoint import to_hf_state_dict
from gptforge.inference import packed

transformers = LazyTransformers()  # tests that use it skip one by one without it

SMALL = dict(
    vocab_size=200, n_positions=48, n_embd=48, n_layer=2, n_head=3, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
)


def _model(**overrides) -> GPT:
    model = GPT(GPTConfig(**{**SMALL, **overrides}))
    with torch.no_grad():  # non-zero biases and LayerNorms, so that every term matters
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _hf_copy(model: GPT):
    """The same weights in a transformers GPT2LMHeadModel."""
    c = model.config
    hf_config = transformers.GPT2Config(**{k: v for k, v in c.to_dict().items() if k not in ("architectures",)})
    hf = transformers.GPT2LMHeadModel(hf_config)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model.state_dict()), strict=False)
    assert missing == ["lm_head.weight"] or not missing, missing
    assert not unexpected
    hf.tie_weights()
    return hf.eval()


def _ids(batch: int, length: int, vocab: int = 200, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- KV cache -------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", [1, 7, 19])
def test_kv_cache_in_pieces_equals_full_forward(split):
    model = _model()
    ids = _ids(2, 20)
    with torch.no_grad():
        full, _ = model(ids)
        cache = model.new_cache(2, 32)
        a, _ = model(ids[:, :split], cache=cache)
        assert cache.length == split
        b, _ = model(ids[:, split:], cache=cache)
    assert cache.length == 20
    torch.testing.assert_close(torch.cat([a, b], dim=1), full, atol=1e-5, rtol=0)


def test_kv_cache_token_by_token_equals_full_forward():
    model = _model()
    ids = _ids(3, 12)
    with torch.no_grad():
        full, _ = model(ids)
        cache = model.new_cache(3)
        steps = [model(ids[:, t : t + 1], cache=cache)[0] for t in range(12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_kv_cache_overflow_and_context_length_are_errors():
    model = _model()
    cache = model.new_cache(1, 8)
    with torch.no_grad():
        model(_ids(1, 6), cache=cache)
        with pytest.raises(ValueError, match="8"):
            model(_ids(1, 3), cache=cache)
        with pytest.raises(ValueError, match="n_positions=48"):
            model(_ids(1, 49))


def test_kv_cache_reorder_keeps_selected_rows():
    model = _model()
    ids = _ids(3, 10)
    with torch.no_grad():
        cache = model.new_cache(3, 16)
        model(ids[:, :9], cache=cache)
        cache.reorder(torch.tensor([2, 0]))
        step, _ = model(ids[[2, 0], 9:], cache=cache)
        full, _ = model(ids[[2, 0]])
    torch.testing.assert_close(step, full[:, -1:], atol=1e-5, rtol=0)


# --- left padding -----------------------------------------------------------------------------------


def _left_padded(rows: list[torch.Tensor], pad: int = 0):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def test_left_padded_batch_matches_single_rows_and_transformers():
    model = _model()
    hf = _hf_copy(model)
    rows = [_ids(1, n, seed=n)[0] for n in (11, 4, 8)]
    ids, mask, positions = _left_padded(rows, pad=7)
    with torch.no_grad():
        batch, _ = model(ids, attention_mask=mask, position_ids=positions)
        reference = hf(ids, attention_mask=mask, position_ids=positions).logits
        assert torch.isfinite(batch).all()
        for i, r in enumerate(rows):
            single, _ = model(r[None])
            torch.testing.assert_close(batch[i, -len(r) :], single[0], atol=1e-5, rtol=0)
    real = mask.bool()
    assert (batch[real] - reference[real]).abs().max().item() <= 1e-4


def test_left_padded_prefill_then_cached_step_matches_single_rows():
    """What generation does: a padded prompt through the cache, then one new token per row."""
    model = _model()
    rows = [_ids(1, n, seed=10 + n)[0] for n in (9, 3)]
    ids, mask, positions = _left_padded(rows)
    nxt = torch.tensor([[5], [17]])
    with torch.no_grad():
        cache = model.new_cache(2, 16)
        model(ids, cache=cache, attention_mask=mask, position_ids=positions)
        mask2 = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        step, _ = model(nxt, cache=cache, attention_mask=mask2, position_ids=positions[:, -1:] + 1)
        for i, r in enumerate(rows):
            single, _ = model(torch.cat([r, nxt[i]])[None])
            torch.testing.assert_close(step[i, 0], single[0, -1], atol=1e-5, rtol=0)


# --- loss, logits_to_keep, gradients -------------------------------------------------------------------


@pytest.mark.parametrize("onednn", [False, True])  # the weight's gradient summed as it is, or transposed
@pytest.mark.parametrize("vocab", [50, 9000])  # one chunk; several chunks of 256 rows (2**20 // 9000 = 116)
def test_chunked_linear_cross_entropy_equals_the_plain_form(vocab, onednn, monkeypatch):
    from gptforge.kernels import linear_cross_entropy

    if onednn and not kernels._onednn_checked():
        pytest.skip("no oneDNN ops in this torch build or on this CPU")
    monkeypatch.setattr(kernels, "_onednn_faster", lambda: onednn)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(700, 32, generator=g, requires_grad=True)
    w = (torch.randn(vocab, 32, generator=g) * 0.3).requires_grad_()
    t = torch.randint(0, vocab, (700,), generator=g)
    t[::7] = -100  # ignored positions count neither in the sum nor in the mean
    ours = linear_cross_entropy(x, w, t)
    (ours * 3).backward()  # a non-unit upstream gradient must scale both gradients
    gx, gw = x.grad, w.grad
    x.grad = w.grad = None
    ref = F.cross_entropy(x @ w.t(), t, ignore_index=-100)
    (ref * 3).backward()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, x.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(gw, w.grad, atol=1e-6, rtol=1e-4)
    with torch.no_grad():  # evaluation: the loss alone
        torch.testing.assert_close(linear_cross_entropy(x, w, t), ref.detach(), atol=1e-5, rtol=1e-5)


def test_loss_head_under_no_grad_computes_no_gradients(monkeypatch):
    """Evaluation (`torch.no_grad()`) with inputs that require grad: one product per chunk, not three."""
    if not kernels.enabled():
        pytest.skip(f"{kernels.SWITCH}=0: the chunked loss head is off")
    calls = []
    real, real_add = kernels.matmul, kernels.matmul_add_
    monkeypatch.setattr(kernels, "matmul", lambda a, b, out=None: calls.append(1) or real(a, b, out=out))
    monkeypatch.setattr(kernels, "matmul_add_", lambda out, a, b: calls.append(1) or real_add(out, a, b))
    x = torch.randn(300, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (300,))
    chunks = -(-300 // max(256, 2**20 // 50))
    with torch.no_grad():
        loss = kernels.linear_cross_entropy(x, w, t)
    assert len(calls) == chunks and not loss.requires_grad
    calls.clear()
    kernels.linear_cross_entropy(x, w, t).backward()
    assert len(calls) == 3 * chunks and x.grad is not None


def test_loss_and_gradients_match_transformers():
    model = _model()
    hf = _hf_copy(model)
    ids = _ids(2, 16)
    targets = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    none, loss = model(ids, targets)
    assert none is None  # with targets, the logits are not kept
    logits, _ = model(ids)
    ref = hf(ids, labels=ids)
    assert abs(loss.item() - ref.loss.item()) <= 1e-5
    # By hand: the mean negative log-likelihood of the next token.
    manual = -torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).mean()
    assert abs(loss.item() - manual.item()) <= 1e-5
    loss.backward()
    ref.loss.backward()
    ours = model.transformer.h[1].attn.c_attn.weight.grad
    theirs = hf.transformer.h[1].attn.c_attn.weight.grad.t()
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.transformer.wte.weight.grad, hf.transformer.wte.weight.grad, atol=1e-5, rtol=1e-4)


def test_logits_to_keep():
    model = _model()
    ids = _ids(2, 10)
    with torch.no_grad():
        full, _ = model(ids)
        last, _ = model(ids, logits_to_keep=1)
        three, _ = model(ids, logits_to_keep=3)
    assert last.shape == (2, 1, 200) and three.shape == (2, 3, 200)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-6, rtol=0)
    torch.testing.assert_close(three, full[:, -3:], atol=1e-6, rtol=0)


# --- initialisation and size -----------------------------------------------------------------------------


def test_gpt2_initialisation():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=4000, n_positions=256, n_embd=256, n_layer=6, n_head=8)
    model = GPT(config)
    std = config.initializer_range
    tr = model.transformer
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):  # residual projections: 1/sqrt(2 n_layer) smaller
            assert p.std().item() == pytest.approx(std / math.sqrt(2 * config.n_layer), rel=0.05), name
        elif name.endswith(("c_attn.weight", "c_fc.weight", "wte.weight", "wpe.weight")):
            assert p.std().item() == pytest.approx(std, rel=0.05), name
            assert abs(p.mean().item()) < 1e-3, name
        elif "ln" in name and name.endswith("weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
    # The output head is the token embedding itself (one storage, one parameter).
    assert model.lm_head.weight is tr.wte.weight
    assert model.lm_head.weight.data_ptr() == tr.wte.weight.data_ptr()
    assert len(list(model.parameters())) == len(model.state_dict()) - 1


@pytest.mark.parametrize(
    "name,expected",
    [
        ("gpt2", 124_439_808),
        ("gpt2-medium", 354_823_168),
        ("gpt2-large", 774_030_080),
        ("gpt2-xl", 1_557_611_200),
    ],
)
def test_parameter_counts_of_the_gpt2_releases(name, expected):
    config = preset(name)
    assert config.num_params() == expected
    with torch.device("meta"):  # counts shapes without allocating gigabytes
        model = GPT(config)
    assert model.num_params() == expected
    assert model.num_params(non_embedding=True) == config.num_params(non_embedding=True)
    assert (
        config.num_params(non_embedding=True)
        == expected - config.vocab_size * config.n_embd - config.n_positions * config.n_embd
    )


@pytest.mark.parametrize(
    "overrides", [dict(n_inner=100), dict(n_head=1, n_layer=1), dict(vocab_size=7), dict(tie_word_embeddings=False)]
)
def test_config_and_model_parameter_counts_agree(overrides):
    from gptforge.inference.quantize import quantize_model

    config = GPTConfig(**{**SMALL, **overrides})
    model = GPT(config)
    assert model.num_params() == config.num_params() == sum(p.numel() for p in model.parameters())
    assert model.num_params(non_embedding=True) == config.num_params(non_embedding=True)
    assert quantize_model(model).num_params() == config.num_params()  # int8 weights are buffers, still counted


# --- activation checkpointing, dropout -------------------------------------------------------------------


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_activation_checkpointing_gives_the_same_gradients(monkeypatch, dropout):
    calls = []
    real_checkpoint = model_module.checkpoint
    monkeypatch.setattr(model_module, "checkpoint", lambda *a, **k: calls.append(1) or real_checkpoint(*a, **k))

    ids = _ids(2, 16)
    grads = []
    for flag in (False, True):
        torch.manual_seed(3)
        model = GPT(GPTConfig(**{**SMALL, "resid_pdrop": dropout, "embd_pdrop": dropout, "attn_pdrop": dropout}))
        model.config.gradient_checkpointing = flag
        model.train()
        torch.manual_seed(4)  # same dropout masks in both runs
        _, loss = model(ids, ids)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert len(calls) == SMALL["n_layer"]  # only the checkpointed run went through checkpoint()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def test_checkpointing_is_off_in_eval(monkeypatch):
    monkeypatch.setattr(model_module, "checkpoint", lambda *a, **k: pytest.fail("checkpoint() in eval"))
    model = _model(gradient_checkpointing=True)
    with torch.no_grad():
        model(_ids(1, 5))


def test_dropout_is_active_in_training_and_off_in_eval():
    model = GPT(GPTConfig(**{**SMALL, "resid_pdrop": 0.3, "embd_pdrop": 0.3, "attn_pdrop": 0.3}))
    ids = _ids(2, 12)
    model.train()
    with torch.no_grad():
        a, _ = model(ids)
        b, _ = model(ids)
    assert not torch.allclose(a, b)
    model.eval()
    with torch.no_grad():
        c, _ = model(ids)
        d, _ = model(ids)
    assert torch.equal(c, d)
    # In eval the dropout model computes what the same weights without dropout compute.
    plain = GPT(GPTConfig(**SMALL)).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain(ids)[0], c, atol=1e-6, rtol=0)


def _cpu_kernels_or_skip():
    if not kernels.enabled():
        pytest.skip(f"{kernels.SWITCH}=0: the CPU dropout and attention kernels are off")


def test_dropout_keeps_a_byte_mask_and_its_gradient_is_the_mask():
    _cpu_kernels_or_skip()
    x = (torch.rand(64, 256) + 0.5).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = kernels.dropout(x, 0.25)
    assert [t.dtype for t in saved] == [torch.bool]  # torch's CPU dropout keeps a float mask as large as x
    mask = (y / x).detach()
    assert ((mask == 0) | ((mask - 1 / 0.75).abs() < 1e-5)).all()
    assert abs((mask == 0).float().mean().item() - 0.25) < 0.02
    y.sum().backward()
    torch.testing.assert_close(x.grad, mask)


def _reference_attention(q, k, v, allowed, keep):
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    return (scores.masked_fill(~allowed, float("-inf")).softmax(-1) * keep) @ v


@pytest.mark.parametrize("padded", [False, True])
def test_attention_with_dropout_matches_the_plain_formula_with_the_same_mask(padded):
    """Output and gradients equal autograd through softmax(q k^T / sqrt(d)) * mask @ v with the same dropout
    mask, while only q, k, v and boolean masks are kept for the backward pass."""
    _cpu_kernels_or_skip()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, generator=g).requires_grad_() for _ in range(3))
    mask = None
    allowed = torch.ones(10, 10, dtype=torch.bool).tril()
    if padded:
        mask = GPT._attention_mask(10, 0, torch.tensor([[1] * 10, [0] * 3 + [1] * 7]), "cpu")
        allowed = mask
    torch.manual_seed(5)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = kernels.attention(q, k, v, mask, dropout_p=0.3, is_causal=mask is None)
    assert all(t.numel() <= q.numel() for t in saved if t.dtype != torch.bool)  # nothing of (B, H, T, T) floats
    gy = torch.randn(y.shape, generator=g)
    ours = torch.autograd.grad(y, (q, k, v), gy)

    torch.manual_seed(5)
    keep = kernels._keep(torch.empty(2, 3, 10, 10), 0.3) / 0.7  # the same draw from the same generator state
    assert 0.15 < (keep == 0).float().mean() < 0.45
    ref = _reference_attention(q, k, v, allowed, keep)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(ours, torch.autograd.grad(ref, (q, k, v), gy)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_attention_without_dropout_is_torchs():
    """With p = 0 the kernel's formula is SDPA's: the same output and gradients."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 12, 8, generator=g).requires_grad_() for _ in range(3))
    allowed = torch.ones(12, 12, dtype=torch.bool).tril()
    ours = kernels._DropoutAttention.apply(q, k, v, ~allowed, 0.0)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    gy = torch.randn(ref.shape, generator=g)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), gy), torch.autograd.grad(ref, (q, k, v), gy)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not kernels._onednn_checked(), reason="no oneDNN ops in this torch build or on this CPU")
def test_onednn_products_give_the_plain_gradients(monkeypatch):
    """The oneDNN paths (used by default on x86 processors other than Intel's) against torch's products."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, n_positions=16, n_embd=32, n_layer=2, n_head=4)).eval()  # no dropout
    x = torch.randint(0, 97, (3, 10))

    def grads(faster: bool):
        monkeypatch.setattr(kernels, "_onednn_faster", lambda: faster)
        assert kernels.onednn() == faster
        model.zero_grad()
        loss = model(x, targets=x)[1]
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    (fast_loss, fast), (plain_loss, plain) = grads(True), grads(False)
    torch.testing.assert_close(fast_loss, plain_loss, atol=1e-5, rtol=1e-5)
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not kernels._onednn_checked(), reason="no oneDNN ops in this torch build or on this CPU")
@pytest.mark.parametrize("faster", [True, False])
def test_cpu_inference_weights_give_the_same_logits_and_follow_weight_updates(monkeypatch, faster):
    monkeypatch.setattr(kernels, "_onednn_faster", lambda: faster)  # oneDNN for prompts, or torch's products
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, n_positions=16, n_embd=32, n_layer=2, n_head=4)).eval()
    x = torch.randint(0, 97, (3, 10))
    step = x[:, :1]  # three rows: what a decoding step multiplies (the decoding kernel where it is built)
    with torch.no_grad():
        plain, plain_step = model(x)[0], model(step)[0]
        with packed.cpu_inference_weights(model):
            assert all("forward" in m.__dict__ for m in model.modules() if isinstance(m, torch.nn.Linear))
            torch.testing.assert_close(model(x)[0], plain, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(model(step)[0], plain_step, atol=1e-5, rtol=1e-5)
            model.transformer.h[0].mlp.c_fc.weight.mul_(2.0)  # an in-place update: the packed copy is remade
            changed = model(step)[0]
        assert not any("forward" in m.__dict__ for m in model.modules())  # plain modules again
        torch.testing.assert_close(changed, model(step)[0], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(changed, plain_step, atol=1e-3)
    assert packed.is_packed(model.transformer.h[0].mlp.c_fc)  # kept for the next call
    with torch.no_grad(), packed.cpu_inference_weights(model, keep=False):
        model(step)
    assert not packed.is_packed(model.transformer.h[0].mlp.c_fc)
    with packed.cpu_inference_weights(model):  # with gradients on, the layer's own path: gradients flow
        model(x, targets=x)[1].backward()
    assert model.transformer.h[0].attn.c_attn.weight.grad is not None


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.bfloat16().float()


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this processor has no bf16 products")
@pytest.mark.parametrize("faster", [True, False])  # oneDNN's path and torch's
def test_bf16_products_round_the_products_inputs_and_nothing_else(monkeypatch, faster):
    """Within kernels.bf16_products a linear layer's three products are those of bf16-rounded inputs summed in
    fp32; outside it, and after it, they are fp32's again."""
    monkeypatch.setattr(kernels, "_onednn_faster", lambda: faster)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 64, generator=g).requires_grad_()
    w = torch.randn(96, 64, generator=g).requires_grad_()
    b, gy = torch.randn(96, generator=g), torch.randn(40, 96, generator=g)
    flag = torch.backends.mkldnn.matmul.fp32_precision
    with kernels.bf16_products():
        y = kernels.linear(x, w, b)
        assert torch.backends.mkldnn.matmul.fp32_precision == flag  # set around each product only
    gx, gw = torch.autograd.grad(y, (x, w), gy)
    tight = dict(atol=1e-4, rtol=1e-4)  # the same rounded inputs, summed in another order
    torch.testing.assert_close(y, _bf16(x) @ _bf16(w).t() + b, **tight)
    torch.testing.assert_close(gx, _bf16(gy) @ _bf16(w), **tight)
    torch.testing.assert_close(gw, _bf16(gy).t() @ _bf16(x), **tight)
    exact = x @ w.t() + b
    assert (y - exact).abs().max() > 1e-3  # rounded: not fp32's products
    torch.testing.assert_close(kernels.linear(x, w, b), exact, atol=1e-4, rtol=1e-4)  # outside: fp32 again
    assert not kernels._BF16 and torch.backends.mkldnn.matmul.fp32_precision == flag


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this processor has no bf16 products")
def test_bf16_products_train_a_model_close_to_fp32():
    """A whole step (products, loss head, attention) within bf16_products: the loss and gradients of fp32 up to
    bf16's rounding of the products' inputs, and not exactly fp32's (the rounding happened)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, n_positions=16, n_embd=32, n_layer=2, n_head=4)).eval()
    x = torch.randint(0, 97, (3, 10))

    def grads(bf16: bool):
        model.zero_grad()
        with kernels.bf16_products(bf16):
            loss = model(x, targets=x)[1]
            loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])

    (loss, grad), (loss32, grad32) = grads(True), grads(False)
    assert 0 < abs(loss - loss32) < 1e-2 * loss32
    assert (grad - grad32).norm() < 2e-2 * grad32.norm() and not torch.equal(grad, grad32)
