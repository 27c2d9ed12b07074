"""A GPT-2 decoding step in one C call, for generation on the CPU at batch 1 to 8.

Through the model's own forward, a token costs some 150 small torch operations around the 49 products
(layer norms, attention for one query, the activation, residual adds, views), tens of microseconds each,
which at batch 1 weigh as much as a fifth of the step. `Decoder` hands the whole step to csrc/decode.c
(`native.step`): the same arithmetic on the same packed weights the decoding kernel reads (fp32, or int8
with per-row scales for a model from quantize.py, its input rows staying fp32), writing the new keys and
values into the model's own `KVCache`, so prompts still run through torch and the two mix freely.

    step = decoder(model, rows)              # None where it does not apply: use model(...) instead
    logits = step(ids, pos, cache, visible)  # (rows, vocab) for one new token per row

It applies to a model in eval mode on the CPU with fp32 embeddings, blocks of plain linear layers
(`nn.Linear` or `Int8Linear`: no adapters) and LayerNorms, an activation the C code knows, at most
native.MAX_ROWS rows (INT8_ROWS for an int8 model), and where the kernel is built and the kernels switch is
on. Its numbers are the model's up to float rounding (sums in another order); an int8 model's are those of
its int8 weights times their scales, without fbgemm's rounding of each input to 8 bits.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import kernels, native
from .kernels import Int8Linear, Linear
from .model import GPT, KVCache

_PLAIN = (nn.Linear, Linear, Int8Linear)
# An int8 model's rows go through the C step up to this many: the step widens int8 weights to fp32 and so
# multiplies at fp32 speed, which a few rows saturate, while fbgemm's int8 products (the torch path) multiply
# four bytes per instruction. bench_decode_step, gpt2 shape, AMD EPYC, 2026-12-01: the C step against fbgemm
# 1.78x at one row, 1.35x at two, 1.18x at three, 0.87x at four, 0.74x at eight (docs/benchmarks.md).
INT8_ROWS = 3


def _plain_linear(layer: nn.Module) -> bool:
    return type(layer) in _PLAIN and (isinstance(layer, Int8Linear) or layer.weight.dtype == torch.float32)


def _plain_norm(norm: nn.Module) -> bool:
    return type(norm) is nn.LayerNorm and norm.weight is not None and norm.bias is not None


def applies(model: GPT) -> bool:
    """Whether the C step can run this model (see the module's docstring); `Decoder.takes` says for how many
    rows."""
    wte = model.transformer.wte.weight
    if (model.training or wte.device.type != "cpu" or wte.dtype != torch.float32
            or model.config.activation_function not in native.ACTIVATIONS or not kernels.enabled()):
        return False
    blocks = model.transformer.h
    if not all(_plain_norm(b.ln_1) and _plain_norm(b.ln_2) and _plain_linear(b.attn.c_attn)
               and _plain_linear(b.attn.c_proj) and _plain_linear(b.mlp.c_fc) and _plain_linear(b.mlp.c_proj)
               for b in blocks):
        return False
    return _plain_norm(model.transformer.ln_f) and _plain_linear(model.lm_head) and native.available()


def max_rows(model: GPT) -> int:
    """How many sequences a step of this model may have to go through C: native.MAX_ROWS, INT8_ROWS int8."""
    return INT8_ROWS if any(isinstance(m, Int8Linear) for m in model.modules()) else native.MAX_ROWS


class Decoder:
    """The C view of a model's weights (packed once, kept with the layers as the decoding kernel keeps them);
    calling it runs one decoding step. Made for one generation: the weights must not change meanwhile."""

    def __init__(self, model: GPT):
        cfg, tr = model.config, model.transformer
        self._keep = []  # every tensor the C structures point into

        def ptr(t: torch.Tensor) -> int:
            t = t.detach().float().contiguous()
            self._keep.append(t)
            return t.data_ptr()

        def weight(layer) -> native.Weight:
            packed = kernels.decoding_weight(layer)
            bias = None if layer.bias is None else layer.bias.detach().float().contiguous()
            self._keep += [packed, bias]
            return packed.struct(bias)

        self.layers = (native.Layer * cfg.n_layer)(*(
            native.Layer(ptr(b.ln_1.weight), ptr(b.ln_1.bias), weight(b.attn.c_attn), weight(b.attn.c_proj),
                         ptr(b.ln_2.weight), ptr(b.ln_2.bias), weight(b.mlp.c_fc), weight(b.mlp.c_proj), None, None)
            for b in tr.h))
        self.model = native.Model(cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.mlp_width, 0, cfg.layer_norm_epsilon,
                                  native.ACTIVATIONS[cfg.activation_function], ptr(tr.wte.weight), ptr(tr.wpe.weight),
                                  ptr(tr.ln_f.weight), ptr(tr.ln_f.bias), weight(model.lm_head), self.layers)
        self.n_positions, self.vocab = cfg.n_positions, model.lm_head.out_features
        self.heads, self.head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        self.max_rows = max_rows(model)

    def takes(self, rows: int) -> bool:
        """Whether a step of `rows` sequences is for the C step (at most MAX_ROWS, INT8_ROWS int8) rather than
        for torch's products."""
        return 0 < rows <= self.max_rows

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, cache: KVCache,
                 visible: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (rows, vocab) for token ids (rows,) at positions pos (rows or rows x 1), continuing `cache`
        (whose length grows by one): a `KVCache`, or any object with its `k`, `v` (lists of contiguous fp32
        (at least rows, heads, positions, head_dim) buffers, sequence r in row r) and `length`. `visible`
        (rows, cache.length + 1; bool): which positions each row attends to (False: padding), None for all."""
        rows, past = ids.numel(), cache.length
        max_len = cache.k[0].size(2)
        if not self.takes(rows):
            raise ValueError(f"the C step takes 1 to {self.max_rows} rows, not {rows}")
        if pos.numel() != rows:
            raise ValueError(f"{pos.numel()} positions for {rows} token ids")
        if past + 1 > max_len or not 0 <= int(pos.min()) <= int(pos.max()) < self.n_positions:
            raise ValueError(f"position {int(pos.max())} or cache length {past + 1} beyond the context "
                             f"({self.n_positions}) or the cache ({max_len})")
        if not 0 <= int(ids.min()) <= int(ids.max()) < self.vocab:
            raise ValueError(f"token ids must be in [0, {self.vocab})")
        for layer, k, v in zip(self.layers, cache.k, cache.v, strict=True):
            if not (k.is_contiguous() and v.is_contiguous() and k.dtype == v.dtype == torch.float32
                    and k.shape == v.shape and k.size(0) >= rows and k.shape[1:] == (self.heads, max_len, self.head_dim)):
                raise ValueError("the KV cache must be contiguous fp32 buffers with a row per sequence")
            layer.k, layer.v = k.data_ptr(), v.data_ptr()
        self.model.max_len = max_len
        ids, pos = ids.reshape(-1).long().contiguous(), pos.reshape(-1).long().contiguous()
        if visible is not None:
            visible = visible.to(torch.bool).contiguous()
            if visible.shape != (rows, past + 1):
                raise ValueError(f"visible must be ({rows}, {past + 1}), not {tuple(visible.shape)}")
        logits = torch.empty(rows, self.vocab)
        native.step(self.model, ids, pos, past, visible, logits)
        cache.length += 1
        return logits


def decoder(model: GPT, rows: int) -> Decoder | None:
    """A Decoder for `rows` sequences of this model, or None where the C step does not apply (checked before
    anything is packed for it)."""
    return Decoder(model) if applies(model) and 0 < rows <= max_rows(model) else None


__all__ = ["Decoder", "INT8_ROWS", "applies", "decoder", "max_rows"]
