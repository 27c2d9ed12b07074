"""CPU fast paths the network calls in training: oneDNN fp32 products, chunked linear + cross-entropy,
dropout, attention-with-dropout and a LoRA adapter's activated input that keep less for the backward pass.
(What only serves decoding, packed weights, the C step and int8 weights, is in inference/.)

fp32 matrix products go through oneDNN rather than torch.mm's BLAS where that was measured faster on this
machine (calibrate.py's `onednn`, once per processor): on a 2-core AMD EPYC oneDNN ran at 2.0-2.4x MKL,
which takes a slow path on other vendors' processors; on an Intel Xeon a training step was a fifth slower
with it (docs/benchmarks.md). The ops are torch's internal `torch.ops.mkldnn.*`, used only when this torch
build has them, when they agree with `F.linear` on a small check the first time they are needed, and when
the environment does not say `GPTFORGE_KERNELS=0` (which turns every fast path here off). Elsewhere (CUDA,
ARM, autocast, torch.compile) each function is the plain torch call.

Within `bf16_products()` (a training run at `--precision auto` on a processor measured to multiply bf16 much
faster: calibrate.py's `bf16`), the products of `linear`, `matmul` and the loss head take bf16-rounded inputs
and sum in fp32 (torch's `mkldnn.matmul.fp32_precision = "bf16"`, set around each product only: attention,
whose small products oneDNN runs several times slower that way, and everything between products stay fp32).
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import calibrate, gelu

SWITCH = "GPTFORGE_KERNELS"  # "0" turns the fast paths off


def enabled() -> bool:
    """Whether the fast paths may be used at all (the environment switch)."""
    return os.environ.get(SWITCH, "1").strip().lower() not in ("0", "off", "false", "no")


@functools.lru_cache(maxsize=1)
def _onednn_checked() -> bool:
    """The oneDNN ops exist on this build and machine and give F.linear's numbers (checked once)."""
    if not (torch.backends.mkldnn.is_available() and platform.machine().lower() in ("x86_64", "amd64")):
        return False
    try:
        g = torch.Generator().manual_seed(0)
        x, w, b = torch.randn(5, 24, generator=g), torch.randn(40, 24, generator=g), torch.randn(40, generator=g)
        ours = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        packed = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w, 1), b, "none", [], "")
        strided = torch.ops.mkldnn._linear_pointwise(x, w.t().contiguous().t(), None, "none", [], "")
    except (AttributeError, RuntimeError):
        return False  # this torch build has no such ops
    ref = F.linear(x, w, b)
    ok = all(torch.allclose(a, r, atol=1e-4, rtol=1e-4) for a, r in ((ours, ref), (packed, ref), (strided, ref - b)))
    if not ok:
        warnings.warn("oneDNN linear products disagree with torch's on this machine; using the plain products")
    return ok


def _onednn_faster() -> bool:
    """Whether oneDNN's products beat torch's BLAS on this machine, as measured (calibrate.py's `onednn`)."""
    return calibrate.decision("onednn")


def onednn() -> bool:
    """Whether fp32 CPU products go through oneDNN in this process: where they work and measured faster."""
    return enabled() and _onednn_checked() and _onednn_faster()


def fp32_cpu(x: torch.Tensor) -> bool:
    """An fp32 CPU input that the fast paths may take (not under autocast or torch.compile)."""
    return (
        enabled()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def _onednn_ok(x: torch.Tensor) -> bool:
    return fp32_cpu(x) and onednn()


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) through oneDNN (fp32 CPU tensors; no autograd)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def onednn_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for 2-D fp32 CPU tensors through oneDNN. `b.t()` is passed as a strided view: oneDNN reads it in
    place, where a contiguous copy of the (vocab x width) head weight for every chunk of the loss cost more than
    the product (gpt2 head with its gradients: 1.97 s with the copy, 1.50 s without)."""
    return onednn_linear(a.contiguous(), b.t())


_BF16 = False  # within `bf16_products(True)`: fp32 products of the fast paths from bf16-rounded inputs


def bf16_faster() -> bool:
    """Whether this processor's products from bf16 inputs were measured much faster than fp32's (calibrate.py's
    `bf16`; AMX or AVX-512 BF16 processors, where the fast paths are on)."""
    return enabled() and calibrate.decision("bf16")


@contextlib.contextmanager
def bf16_products(on: bool = True):
    """Within: the fp32 CPU products of `linear`, `matmul`, `matmul_add_` and the loss head round their inputs to
    bf16 and sum in fp32 (where `on`; a training run at `--precision auto` where `bf16_faster()`)."""
    global _BF16
    before, _BF16 = _BF16, on
    try:
        yield
    finally:
        _BF16 = before


@contextlib.contextmanager
def _precision():
    """torch's fp32 products in bf16 for the time of one product, within `bf16_products`."""
    if not _BF16:
        yield
        return
    flag = torch.backends.mkldnn.matmul
    before, flag.fp32_precision = flag.fp32_precision, "bf16"
    try:
        yield
    finally:
        flag.fp32_precision = before


def bf16_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b from bf16-rounded inputs, fp32 sums and result (what `bf16_products` does; calibration measures it)."""
    with bf16_products(), _precision():
        return a @ b


def matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b for 2-D tensors, through oneDNN for fp32 on x86 CPUs where that is used; written into `out`
    (contiguous, of the result's shape) when given."""
    with _precision():
        if _onednn_ok(a):
            product = onednn_matmul(a, b)
            return product if out is None else out.copy_(product)
        return a @ b if out is None else torch.mm(a, b, out=out)


def weight_gradient(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """g^T x, the weight gradient of a linear layer from its output gradient g (N, out) and input x (N, in).
    `matmul` makes its first factor contiguous, so the narrower of the two is the one transposed: for a layer
    that widens (GPT-2's c_attn and c_fc) x^T g and a transpose of the small (in, out) result."""
    return matmul(g.t(), x) if g.size(1) <= x.size(1) else matmul(x.t(), g).t().contiguous()


def matmul_add_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """out += a @ b in place: torch's addmm_ adds into `out` without the temporary a product of its own makes
    (for gpt2's head, a (768 x 50257) temporary and one more pass over it for each chunk of the loss)."""
    with _precision():
        return out.add_(onednn_matmul(a, b)) if _onednn_ok(a) else out.addmm_(a, b)


class _Linear(torch.autograd.Function):
    """`F.linear` with its three products (forward, input gradient, weight gradient) done by `matmul`'s paths:
    oneDNN where that was measured faster, bf16 inputs within `bf16_products`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # x is kept only for the weight's gradient: a frozen layer (LoRA's base, --freeze) lets it go
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)
        ctx.x_shape, ctx.has_bias, ctx.bf16 = x.shape, bias is not None, _BF16  # the backward's products alike
        with _precision():
            return onednn_linear(x, weight, bias) if _onednn_ok(x) else F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.size(-1))
        with bf16_products(ctx.bf16):
            grad_x = matmul(g, weight).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
            grad_w = weight_gradient(g, x.reshape(-1, x.size(-1))) if ctx.needs_input_grad[1] else None
        grad_b = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, through oneDNN for fp32 on x86 CPUs where measured faster, from bf16 inputs within
    `bf16_products`, the plain call elsewhere."""
    if weight.dtype == torch.float32 and fp32_cpu(x) and (_BF16 or onednn()):
        return _Linear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same state dict) whose products go through `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


calibrate.MEASURES["products"] = lambda: calibrate.compare_products(onednn_matmul)
calibrate.MEASURES["bf16"] = lambda: calibrate.compare_bf16(bf16_matmul)
# --- the loss head -------------------------------------------------------------------------------------


def _chunked_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, want_x: bool, want_w: bool):
    """Summed cross-entropy of `x @ weight.T`, a few hundred rows at a time, and (only when wanted) the
    gradients of the mean, computed from each chunk's softmax while it is in cache."""
    rows = max(256, 2**20 // weight.size(0))  # about 4 MB of logits a chunk (fastest measured, 5,000-token vocabulary)
    valid = targets != -100
    safe = targets.clamp(min=0)
    count = valid.sum().clamp(min=1)
    grad_x = torch.empty_like(x) if want_x else None
    # The weight's gradient is summed chunk by chunk as p^T xs into (vocab, width), torch's products reading p^T in
    # place (gpt2's head: 288 ms against 414 summed transposed, 144 against 305 from bf16 inputs). oneDNN's take a
    # contiguous first factor, so there it is summed transposed, xs^T p (the copy is the chunk's width x rows, not
    # its vocab x rows), and transposed once at the end.
    transposed = _onednn_ok(x)
    shape = weight.shape[::-1] if transposed else weight.shape
    grad_w = weight.new_zeros(shape) if want_w else None
    total = x.new_zeros((), dtype=torch.float32)
    # One buffer serves every chunk's logits: a fresh 5 MB tensor a chunk costs its page faults each time
    # (tiny's loss head 53 -> 44 ms a step, gpt2's 1.18 -> 1.11 s, docs/benchmarks-history.md).
    logits = x.new_empty(min(rows, x.size(0)), weight.size(0))
    for s in range(0, x.size(0), rows):
        xs, ts, vs = x[s : s + rows], safe[s : s + rows], valid[s : s + rows]
        z = matmul(xs, weight.t(), out=logits[: xs.size(0)])
        target = z.gather(1, ts[:, None]).squeeze(1)
        top = z.amax(dim=1, keepdim=True)
        e = z.sub_(top).exp_()  # exp(z - max), in place: one exp pass serves the loss and the softmax
        total_e = e.sum(dim=1)
        total += ((top.squeeze(1) + total_e.log() - target) * vs).sum()  # log-sum-exp - target logit
        if not (want_x or want_w):
            continue
        p = e.mul_((vs / total_e)[:, None])  # softmax, zero on ignored rows
        p[torch.arange(p.size(0), device=p.device), ts] -= vs.to(p.dtype)
        if want_x:
            matmul(p, weight, out=grad_x[s : s + rows])
        if want_w:
            matmul_add_(grad_w, *((xs.t(), p) if transposed else (p.t(), xs)))
    return total, count, grad_x, (grad_w.t().contiguous() if want_w and transposed else grad_w)


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `x @ weight.T` against `targets`, with the gradients computed in the forward pass.

    The (tokens, vocab) logits are never held whole: each chunk's logits live in cache just long enough for
    their log-sum-exp and their softmax - one-hot, whose products with `weight` and `x` are the gradients;
    the backward only scales them. For `gpt2` at 8 x 1024 tokens that is 1.6 GB of fp32 logits not allocated.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        total, count, grad_x, grad_w = _chunked_cross_entropy(x, weight, targets, *ctx.needs_input_grad[:2])
        scale = 1.0 / count
        ctx.save_for_backward(grad_x, grad_w, scale)
        return total * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_x, grad_w, scale = ctx.saved_tensors
        g = grad * scale
        return (grad_x * g if grad_x is not None else None), (grad_w * g if grad_w is not None else None), None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`F.cross_entropy(x @ weight.T, targets, ignore_index=-100)` for x (N, C), weight (V, C), targets (N,).

    On the CPU in fp32 it runs chunk by chunk (less memory, faster), and computes gradients only when
    autograd will want them; elsewhere (CUDA, autocast), where torch.compile fuses the plain form and mixed
    precision needs its casts, it is the plain form.
    """
    if not (enabled() and x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")):
        return F.cross_entropy((x @ weight.t()).float(), targets, ignore_index=-100)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(x, weight, targets)
    total, count, _, _ = _chunked_cross_entropy(x, weight, targets, False, False)
    return total / count


# --- GPT-2's GELU --------------------------------------------------------------------------------------


class _GeluTanh(torch.autograd.Function):
    """gelu(x) (tanh form) and its gradient in C (gelu.py), keeping x for the backward as torch's GELU does."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return gelu.forward(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return gelu.backward(x, grad.contiguous())


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """`F.gelu(x, approximate="tanh")`, GPT-2's activation: in C for fp32 CPU tensors where that was measured
    faster (calibrate.py's `gelu`), torch's elsewhere."""
    if fp32_cpu(x) and x.is_contiguous() and calibrate.decision("gelu") and gelu.available():
        return _GeluTanh.apply(x)
    return F.gelu(x, approximate="tanh")


# --- dropout with one-byte masks ---------------------------------------------------------------------


def _cpu_path(x: torch.Tensor) -> bool:
    return enabled() and x.device.type == "cpu" and not torch.compiler.is_compiling()


def _keep(like: torch.Tensor, p: float) -> torch.Tensor:
    """Boolean dropout mask, True where kept (probability 1-p), from torch's global generator: seeded runs
    repeat, and activation checkpointing, which restores the generator before recomputing, draws it again.
    Drawn a megabyte of floats at a time (torch.rand is twice as fast as bernoulli_ on the CPU, but a float
    tensor of the input's size on the way leaves holes in the heap that glibc does not give back)."""
    keep = torch.empty(like.shape, dtype=torch.bool, device=like.device)
    flat, n = keep.view(-1), 1 << 18
    for s in range(0, flat.numel(), n):
        part = flat[s : s + n]
        torch.ge(torch.rand(part.numel(), device=like.device), p, out=part)
    return keep


class _Dropout(torch.autograd.Function):
    """x * mask / (1-p), keeping the mask for the backward pass as bytes: torch's CPU dropout keeps it as floats."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        keep = _keep(x, p)
        ctx.save_for_backward(keep)
        ctx.scale = 1 / (1 - p)
        return x.mul(keep).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """`F.dropout`; on the CPU keeping a one-byte mask for the backward pass (`_Dropout`)."""
    if not training or p == 0:
        return x
    if _cpu_path(x) and torch.is_grad_enabled() and x.requires_grad and 0 < p < 1:
        return _Dropout.apply(x, p)
    return F.dropout(x, p, training)


class Dropout(nn.Dropout):
    """`nn.Dropout` through `dropout`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def _attention_probs(q: torch.Tensor, k: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
    scores = (q @ k.transpose(-2, -1)).mul_(q.size(-1) ** -0.5).masked_fill_(blocked, float("-inf"))
    return torch._softmax(scores, -1, False, out=scores)  # in place: one (batch, heads, T, T) tensor, not two


class _DropoutAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(d), -inf where blocked) with dropout, times v, keeping q, k, v and the one-byte dropout
    mask: the backward computes the probabilities again. torch's CPU attention with dropout falls back to
    its plain path, which keeps three float (batch, heads, T, T) tensors per layer for the backward: a third
    of gpt2-medium's saved activations at 256 tokens."""

    @staticmethod
    def forward(ctx, q, k, v, blocked, p):
        probs = _attention_probs(q, k, blocked)
        keep = _keep(probs, p)
        ctx.save_for_backward(q, k, v, blocked, keep)
        ctx.scale = 1 / (1 - p)
        return probs.mul_(keep).mul_(ctx.scale) @ v

    @staticmethod
    def backward(ctx, grad):
        q, k, v, blocked, keep = ctx.saved_tensors
        probs = _attention_probs(q, k, blocked)
        grad_v = probs.mul(keep).mul_(ctx.scale).transpose(-2, -1) @ grad
        grad_probs = (grad @ v.transpose(-2, -1)).mul_(keep).mul_(ctx.scale)
        grad_scores = probs.mul_(grad_probs.sub_((grad_probs * probs).sum(-1, keepdim=True)))  # softmax backward
        scale = q.size(-1) ** -0.5
        return (grad_scores @ k).mul_(scale), (grad_scores.transpose(-2, -1) @ q).mul_(scale), grad_v, None, None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
) -> torch.Tensor:
    """`F.scaled_dot_product_attention` (boolean or no mask); in CPU training with dropout, `_DropoutAttention`."""
    if (
        dropout_p > 0
        and _cpu_path(q)
        and q.dtype == torch.float32
        and torch.is_grad_enabled()
        and q.requires_grad
        and (mask is None or mask.dtype == torch.bool)
    ):
        if mask is not None:
            blocked = ~mask
        elif is_causal:  # SDPA's is_causal: query i sees keys 0..i
            blocked = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).triu(1)
        else:
            blocked = torch.zeros(1, 1, dtype=torch.bool, device=q.device)
        return _DropoutAttention.apply(q, k, v, blocked, dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)


class _ActivationDown(torch.autograd.Function):
    """h = act(u) and z = dropout(h) @ weight^T, keeping u and the one-byte mask: h is computed again in the
    backward pass. A LoRA adapter on the MLP's c_proj would otherwise keep its input, the block's widest
    tensor (4 x n_embd), besides the u that the activation keeps."""

    @staticmethod
    def forward(ctx, u, weight, act, p):
        h = act(u)
        keep = _keep(h, p) if p else None
        ctx.save_for_backward(u, weight, keep)
        ctx.act, ctx.scale = act, 1 / (1 - p)
        return h, linear(h.mul(keep).mul_(ctx.scale) if p else h, weight)

    @staticmethod
    def backward(ctx, grad_h, grad_z):
        u, weight, keep = ctx.saved_tensors
        with torch.enable_grad():
            u_ = u.detach().requires_grad_()
            h = ctx.act(u_)
        g = grad_z.reshape(-1, grad_z.size(-1))
        grad_w = None
        if ctx.needs_input_grad[1]:
            hd = h.detach().mul(keep).mul_(ctx.scale) if keep is not None else h.detach()
            grad_w = matmul(g.t(), hd.reshape(-1, hd.size(-1)))
            del hd
        grad_hd = matmul(g, weight).view(u.shape)
        if keep is not None:
            grad_hd.mul_(keep).mul_(ctx.scale)
        if grad_h is not None:
            grad_hd += grad_h
        (grad_u,) = torch.autograd.grad(h, u_, grad_hd)
        return grad_u, grad_w, None, None


def activation_down(u: torch.Tensor, act, weight: torch.Tensor, p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(act(u), dropout(act(u), p) @ weight^T): the activation and a LoRA down-projection of it; in fp32 CPU
    training, `_ActivationDown` (u and a one-byte mask kept, not act(u) and its dropped copy)."""
    if _cpu_path(u) and u.dtype == weight.dtype == torch.float32 and torch.is_grad_enabled():
        return _ActivationDown.apply(u, weight, act, p)
    h = act(u)
    return h, linear(dropout(h, p), weight)


__all__ = [
    "SWITCH",
    "Linear",
    "bf16_faster",
    "bf16_matmul",
    "bf16_products",
    "enabled",
    "fp32_cpu",
    "gelu_tanh",
    "linear",
    "linear_cross_entropy",
    "matmul",
    "onednn",
    "onednn_linear",
    "onednn_matmul",
]
