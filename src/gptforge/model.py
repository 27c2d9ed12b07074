"""The GPT-2 network.

Module and parameter names follow transformers' GPT2LMHeadModel (`transformer.h.0.attn.c_attn.weight`, ...)
so that a state dict maps one to one; the only difference is that our projections are `nn.Linear`
(weight stored (out, in)) where transformers uses Conv1D (weight stored (in, out)). `checkpoint.py`
transposes those on the way in and out.
"""
from __future__ import annotations

import contextlib
import math
import platform
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import GPTConfig


def _activation(name: str):
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: F.gelu(x, approximate="tanh")  # GPT-2's tanh approximation of GELU
    if name == "gelu":
        return F.gelu
    if name == "relu":
        return F.relu
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    raise ValueError(f"unsupported activation_function {name!r}")


class KVCache:
    """Preallocated keys and values for incremental decoding.

    One (batch, heads, max_len, head_dim) buffer per layer for keys and for values; `length` is how
    many positions are filled. Writing in place avoids the re-allocation that concatenating costs
    at every new token.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device=None, dtype=None):
        shape = (batch_size, config.n_head, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; cannot write up to {end}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in `index` (e.g. dropping finished sequences)."""
        self.k = [t.index_select(0, index) for t in self.k]
        self.v = [t.index_select(0, index) for t in self.v]


# On x86 CPUs, fp32 matrix products go through oneDNN rather than the BLAS that torch.mm calls: on the 2-core
# AMD EPYC we measure on, oneDNN ran them at 2.0-2.4x the BLAS rate (docs/benchmarks.md), same fp32 math.
def _has_onednn_ops() -> bool:
    """Whether this torch build has the (internal) oneDNN linear ops we call; a build without them keeps F.linear."""
    try:
        torch.ops.mkldnn._linear_pointwise, torch.ops.mkldnn._reorder_linear_weight
    except (AttributeError, RuntimeError):
        return False
    return True


_ONEDNN = (torch.backends.mkldnn.is_available() and platform.machine().lower() in ("x86_64", "amd64")
           and _has_onednn_ops())


def _onednn_ok(x: torch.Tensor) -> bool:
    return (_ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) through oneDNN (fp32 CPU tensors; no autograd)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for 2-D fp32 CPU tensors, through oneDNN where it is used. `b.t()` is passed as a strided view:
    oneDNN reads it in place, where a contiguous copy of the (vocab x width) head weight for every chunk of
    the loss cost more than the product (gpt2 head with its gradients: 1.97 s with the copy, 1.50 s without)."""
    return _linear(a.contiguous(), b.t()) if _onednn_ok(a) else a @ b


class _OneDNNLinear(torch.autograd.Function):
    """`F.linear` with its three products (forward, input gradient, weight gradient) done by oneDNN."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.size(-1))
        grad_x = _matmul(g, weight).view(x.shape) if ctx.needs_input_grad[0] else None
        grad_w = _matmul(g.t(), x.reshape(-1, x.size(-1))) if ctx.needs_input_grad[1] else None
        grad_b = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, through oneDNN for fp32 on x86 CPUs (see _ONEDNN), the plain call elsewhere."""
    if _onednn_ok(x) and weight.dtype == torch.float32:
        return _OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same state dict) whose products go through `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `x @ weight.T` against `targets`, a few hundred rows at a time.

    The (tokens, vocab) logits are never held whole: each chunk's logits live in cache just long enough
    for their log-sum-exp and, when gradients are wanted, their softmax - one-hot, whose products with
    `weight` and `x` are the gradients. So the gradients are computed in the forward pass and only scaled
    in the backward. Same products as the plain path, without the three (tokens, vocab) passes through
    memory; for `gpt2` at 8 x 1024 tokens that is 1.6 GB of fp32 logits not allocated.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        rows = max(256, 2**21 // weight.size(0))
        valid = targets != -100
        safe = targets.clamp(min=0)
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        total = x.new_zeros((), dtype=torch.float32)
        for s in range(0, x.size(0), rows):
            xs, ts, vs = x[s : s + rows], safe[s : s + rows], valid[s : s + rows]
            z = _matmul(xs, weight.t()).float()
            target = z.gather(1, ts[:, None]).squeeze(1)
            top = z.amax(dim=1, keepdim=True)
            e = z.sub_(top).exp_()  # exp(z - max), in place: one exp pass serves the loss and the softmax
            total_e = e.sum(dim=1)
            total += ((top.squeeze(1) + total_e.log() - target) * vs).sum()  # log-sum-exp - target logit
            if grad_x is None and grad_w is None:
                continue
            p = e.mul_((vs / total_e)[:, None])  # softmax, zero on ignored rows
            p[torch.arange(p.size(0), device=p.device), ts] -= vs.to(p.dtype)
            p = p.to(x.dtype)
            if grad_x is not None:
                grad_x[s : s + rows] = _matmul(p, weight)
            if grad_w is not None:
                grad_w += _matmul(p.t(), xs)
        scale = 1.0 / valid.sum().clamp(min=1)
        ctx.save_for_backward(grad_x, grad_w, scale)
        return total * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_x, grad_w, scale = ctx.saved_tensors
        g = grad * scale
        return (grad_x * g if grad_x is not None else None), (grad_w * g if grad_w is not None else None), None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`F.cross_entropy(x @ weight.T, targets, ignore_index=-100)` for x (N, C), weight (V, C), targets (N,).

    On the CPU in fp32 it runs chunk by chunk (`_LinearCrossEntropy`: less memory, faster); elsewhere
    (CUDA, autocast), where torch.compile fuses the plain form and mixed precision needs its casts, it is
    the plain form.
    """
    if x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"):
        return _LinearCrossEntropy.apply(x, weight, targets)
    return F.cross_entropy((x @ weight.t()).float(), targets, ignore_index=-100)


_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # nn.Linear -> (weight key, packed weight)


def _packed_weight(linear: nn.Linear) -> torch.Tensor:
    """`linear.weight` reordered for oneDNN, made once and reused until the weight changes (in-place
    updates bump the tensor's version, a new tensor changes its address); freed with the layer."""
    w = linear.weight
    key = (w.data_ptr(), w._version)
    cached = _PACKED.get(linear)
    if cached is None or cached[0] != key:
        cached = _PACKED[linear] = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach(), 1))
    return cached[1]


@contextlib.contextmanager
def cpu_inference_weights(model: nn.Module, keep: bool = True):
    """For the duration, the model's `nn.Linear` layers multiply with oneDNN-packed copies of their fp32 CPU
    weights (gradients off). Same products, same results up to float rounding; for decoding, where each step
    multiplies a few rows by every weight, about twice as fast as the plain BLAS call on a 2-core x86 CPU
    (docs/benchmarks.md). The copies cost as much memory as the weights and are made on first use (~0.15 s
    for `gpt2`); with `keep` they are reused by later calls while the weights stay unchanged, without it
    (a model in training, whose weights change anyway) they are dropped on exit. Elsewhere (CUDA, bf16,
    no oneDNN) it does nothing.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.weight.device.type == "cpu"
               and m.weight.dtype == torch.float32]
    if not linears or not _ONEDNN:
        yield model
        return
    def packed_forward(linear: nn.Linear):
        def forward(x: torch.Tensor) -> torch.Tensor:
            if torch.is_grad_enabled() or not _onednn_ok(x):
                return type(linear).forward(linear, x)  # the layer's own path
            return _linear(x, _packed_weight(linear), linear.bias)
        return forward
    try:
        for m in linears:
            m.forward = packed_forward(m)
        yield model
    finally:
        for m in linears:
            m.__dict__.pop("forward", None)
            if not keep:
                _PACKED.pop(m, None)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head = config.n_head
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.attn_dropout = config.attn_pdrop
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        # Plain causal attention needs no mask tensor: SDPA picks its fastest kernel for is_causal.
        is_causal = mask is None and k.size(2) == T and T > 1
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_dropout if self.training else 0.0, is_causal=is_causal
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, config.mlp_width)
        self.c_proj = Linear(config.mlp_width, config.n_embd)
        self.act = _activation(config.activation_function)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """The body (transformers' GPT2Model): embeddings, blocks, final LayerNorm."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)


class GPT(nn.Module):
    """GPT-2 language model (transformers' GPT2LMHeadModel), output head tied to the token embedding."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer): each block adds two of them.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=config.initializer_range / math.sqrt(2 * config.n_layer))

    @classmethod
    def empty(cls, config: GPTConfig) -> "GPT":
        """A model on the meta device, with no storage and no initialisation, to load weights into.

        Initialisers on meta tensors are not free (the first one imports torch's compiler stack, seconds
        per process), so they are switched off while the modules are built, as transformers does.
        """
        names = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_")
        saved = {name: getattr(nn.init, name) for name in names}
        try:
            for name in names:
                setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
            with torch.device("meta"):
                return cls(config)
        finally:
            for name, fn in saved.items():
                setattr(nn.init, name, fn)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, tied head counted once; `non_embedding` leaves out wte and wpe."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return n

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        p = self.transformer.wte.weight
        return KVCache(self.config, batch_size, max_len or self.config.n_positions, p.device, p.dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for `input_ids` (B, T) and None; or, given `targets`, None and the mean cross-entropy.

        `targets` are already shifted (targets[:, t] is the token after input_ids[:, t]); -100 is ignored.
        With targets the logits are not returned: the loss is computed without holding all of them
        (`linear_cross_entropy`), which saves B x T x vocab floats.
        With a `cache`, `input_ids` continue the cached sequence and their keys/values are appended.
        `attention_mask` (B, past + T; 1 = real token, 0 = padding) supports left-padded batches.
        `logits_to_keep=k` computes logits for the last k positions only (generation needs one).
        """
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if past + T > self.config.n_positions:
            raise ValueError(
                f"sequence of {past + T} tokens is longer than the model's context n_positions={self.config.n_positions}"
            )
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).unsqueeze(0)
        mask = self._attention_mask(T, past, attention_mask, input_ids.device)
        tr = self.transformer
        x = tr.drop(tr.wte(input_ids) + tr.wpe(position_ids))
        for block in tr.h:
            if self.config.gradient_checkpointing and self.training:
                x = checkpoint(block, x, cache, mask, use_reentrant=False)
            else:
                x = block(x, cache, mask)
        if cache is not None:
            cache.length += T
        x = tr.ln_f(x)
        if targets is not None:
            return None, linear_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.flatten())
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return self.lm_head(x), None

    @staticmethod
    def _attention_mask(T: int, past: int, attention_mask: torch.Tensor | None, device) -> torch.Tensor | None:
        """Boolean (B or 1, 1, T, past+T) mask, or None when plain causal attention is enough."""
        if attention_mask is None and (past == 0 or T == 1):
            return None  # causal (is_causal in SDPA) or one new token that may see everything
        S = past + T
        mask = torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=past)[None, None]
        if attention_mask is not None:
            keep = attention_mask[:, None, None, :S].bool()
            # A padding query would attend to nothing (NaN in SDPA); let every position see itself.
            diag = torch.zeros(T, S, dtype=torch.bool, device=device)
            diag[torch.arange(T), torch.arange(past, S)] = True
            mask = (mask & keep) | diag
        return mask
