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
(`nn.Linear` or `Int8Linear`: no adapters) and LayerNorms, an activation the C code knows, and where the
kernel is built and the kernels switch is on; for as many rows as it was measured faster than the model's
torch forward on this machine (calibrate.py's `fp32_rows` and `int8_rows`, at most cpu.MAX_ROWS), on the
measured number of threads (`threads`). Its numbers are the model's up to float rounding (sums in another order); an
int8 model's are those of
its int8 weights times their scales, without fbgemm's rounding of each input to 8 bits.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .. import calibrate, cpu, kernels
from ..kernels import Linear
from ..model import GPT, KVCache
from . import native
from .int8 import Int8Linear, is_int8
from .packed import cpu_inference_weights, decoding_weight

_PLAIN = (nn.Linear, Linear, Int8Linear)
# An int8 model's step widens its weights to fp32 in C, while fbgemm's int8 products (the torch path) multiply
# four bytes per instruction: which is faster at how many rows depends on the processor (on an AMD EPYC with
# AVX-512 the C step led up to three rows, docs/benchmarks.md), so it is measured (`max_rows`).


def _plain_linear(layer: nn.Module) -> bool:
    return type(layer) in _PLAIN and (isinstance(layer, Int8Linear) or layer.weight.dtype == torch.float32)


def _plain_norm(norm: nn.Module) -> bool:
    return type(norm) is nn.LayerNorm and norm.weight is not None and norm.bias is not None


def applies(model: GPT) -> bool:
    """Whether the C step can run this model (see the module's docstring); `Decoder.takes` says for how many
    rows."""
    wte = model.transformer.wte.weight
    if (
        model.training
        or wte.device.type != "cpu"
        or wte.dtype != torch.float32
        or model.config.activation_function not in native.ACTIVATIONS
        or not kernels.enabled()
    ):
        return False
    blocks = model.transformer.h
    if not all(
        _plain_norm(b.ln_1)
        and _plain_norm(b.ln_2)
        and _plain_linear(b.attn.c_attn)
        and _plain_linear(b.attn.c_proj)
        and _plain_linear(b.mlp.c_fc)
        and _plain_linear(b.mlp.c_proj)
        for b in blocks
    ):
        return False
    return _plain_norm(model.transformer.ln_f) and _plain_linear(model.lm_head) and native.available()


def max_rows(model: GPT) -> int:
    """Up to how many sequences a step of this model goes through C: as measured on this machine (calibrate.py:
    `int8_rows` for int8 weights, else `fp32_rows`; 0 to cpu.MAX_ROWS)."""
    return calibrate.decision("int8_rows" if is_int8(model) else "fp32_rows")


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
            packed = decoding_weight(layer)
            bias = None if layer.bias is None else layer.bias.detach().float().contiguous()
            self._keep += [packed, bias]
            return packed.struct(bias)

        self.layers = (native.Layer * cfg.n_layer)(
            *(
                native.Layer(
                    ptr(b.ln_1.weight),
                    ptr(b.ln_1.bias),
                    weight(b.attn.c_attn),
                    weight(b.attn.c_proj),
                    ptr(b.ln_2.weight),
                    ptr(b.ln_2.bias),
                    weight(b.mlp.c_fc),
                    weight(b.mlp.c_proj),
                    None,
                    None,
                )
                for b in tr.h
            )
        )
        self.model = native.Model(
            cfg.n_layer,
            cfg.n_head,
            cfg.n_embd,
            cfg.mlp_width,
            0,
            cfg.layer_norm_epsilon,
            native.ACTIVATIONS[cfg.activation_function],
            ptr(tr.wte.weight),
            ptr(tr.wpe.weight),
            ptr(tr.ln_f.weight),
            ptr(tr.ln_f.bias),
            weight(model.lm_head),
            self.layers,
        )
        self.n_positions, self.vocab = cfg.n_positions, model.lm_head.out_features
        self.heads, self.head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        self.int8 = is_int8(model)

    def takes(self, rows: int) -> bool:
        """Whether a step of `rows` sequences is for the C step (measured faster there) rather than for torch's
        forward."""
        return 0 < rows <= calibrate.decision("int8_rows" if self.int8 else "fp32_rows")

    def __call__(
        self, ids: torch.Tensor, pos: torch.Tensor, cache: KVCache, visible: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits (rows, vocab) for token ids (rows,) at positions pos (rows or rows x 1), continuing `cache`
        (whose length grows by one): a `KVCache`, or any object with its `k`, `v` (lists of contiguous fp32
        (at least rows, heads, positions, head_dim) buffers, sequence r in row r) and `length`. `visible`
        (rows, cache.length + 1; bool): which positions each row attends to (False: padding), None for all."""
        return self.run(ids, pos, cache, visible, calibrate.decision("threads"), calibrate.decision("prefetch"))

    def run(
        self,
        ids: torch.Tensor,
        pos: torch.Tensor,
        cache: KVCache,
        visible: torch.Tensor | None,
        threads: int,
        prefetch: bool,
    ) -> torch.Tensor:
        """The step (see __call__) on `threads` threads (0: torch's number), prefetching the weights in software
        for every tile or not (native.set_prefetch), whatever the measured choices."""
        rows, past = ids.numel(), cache.length
        max_len = cache.k[0].size(2)
        if not 0 < rows <= cpu.MAX_ROWS:
            raise ValueError(f"the C step takes 1 to {cpu.MAX_ROWS} rows, not {rows}")
        if pos.numel() != rows:
            raise ValueError(f"{pos.numel()} positions for {rows} token ids")
        if past + 1 > max_len or not 0 <= int(pos.min()) <= int(pos.max()) < self.n_positions:
            raise ValueError(
                f"position {int(pos.max())} or cache length {past + 1} beyond the context "
                f"({self.n_positions}) or the cache ({max_len})"
            )
        if not 0 <= int(ids.min()) <= int(ids.max()) < self.vocab:
            raise ValueError(f"token ids must be in [0, {self.vocab})")
        for layer, k, v in zip(self.layers, cache.k, cache.v, strict=True):
            if not (
                k.is_contiguous()
                and v.is_contiguous()
                and k.dtype == v.dtype == torch.float32
                and k.shape == v.shape
                and k.size(0) >= rows
                and k.shape[1:] == (self.heads, max_len, self.head_dim)
            ):
                raise ValueError("the KV cache must be contiguous fp32 buffers with a row per sequence")
            layer.k, layer.v = k.data_ptr(), v.data_ptr()
        self.model.max_len = max_len
        ids, pos = ids.reshape(-1).long().contiguous(), pos.reshape(-1).long().contiguous()
        if visible is not None:
            visible = visible.to(torch.bool).contiguous()
            if visible.shape != (rows, past + 1):
                raise ValueError(f"visible must be ({rows}, {past + 1}), not {tuple(visible.shape)}")
        logits = torch.empty(rows, self.vocab)
        before = torch.get_num_threads()
        if threads and threads != before:
            torch.set_num_threads(threads)  # torch's OpenMP pool, which the kernel shares
        native.set_prefetch(prefetch)
        try:
            native.step(self.model, ids, pos, past, visible, logits)
        finally:
            if threads and threads != before:
                torch.set_num_threads(before)
        cache.length += 1
        return logits


def decoder(model: GPT, rows: int) -> Decoder | None:
    """A Decoder for `rows` sequences of this model, or None where the C step does not apply (checked before
    anything is packed for it)."""
    return Decoder(model) if applies(model) and 0 < rows <= max_rows(model) else None


def _step_times(steps: dict, model: GPT, rows: int) -> dict[str, list[float]]:
    """Timings (calibrate.timings) of one decoding step of `rows` sequences after 32 cached positions for each
    of `steps` (name: `step(ids, pos, cache)`), taken in turn."""
    cache, ids, pos = model.new_cache(rows, 40), torch.zeros(rows, dtype=torch.long), torch.full((rows, 1), 32)

    def once(step):
        def run():
            cache.length = 32
            step(ids, pos, cache)

        return run

    return calibrate.timings({name: once(step) for name, step in steps.items()})


def _rows_in_c(model: GPT, name: str, timings: dict, prefetch: bool) -> int:
    """Up to how many rows the C step is not beaten by the model's torch forward (stopping at the first where
    it is)."""
    c_step = Decoder(model)
    steps = {
        "c": lambda i, p, c: c_step.run(i, p, c, None, 0, prefetch),
        "torch": lambda i, p, c: model(i[:, None], cache=c, position_ids=p, logits_to_keep=1),
    }
    timings[f"{name}_step_ms"] = table = {}
    with cpu_inference_weights(model):
        for rows in range(1, cpu.MAX_ROWS + 1):
            t = _step_times(steps, model, rows)
            table[rows] = calibrate.best_ms(t)
            if calibrate.beats(t, "torch", "c"):
                return rows - 1
    return cpu.MAX_ROWS


def measure_steps() -> tuple[dict, dict]:
    """The `fp32_rows`, `int8_rows` and `threads` decisions, from decoding steps of a two-block model of gpt2's
    width (an 8,192-token head), fp32 and int8, C against torch at each row count, the C step on 1, torch's
    and all the CPUs' threads."""
    if not (kernels.enabled() and native.available()):
        return {}, {}  # nothing to choose between
    from ..config import GPTConfig
    from .quantize import quantize_model

    # not inference mode (first use may come inside generate's): the packed copies are keyed by weight versions
    with torch.inference_mode(False), torch.random.fork_rng(devices=[]):  # and the caller's random numbers stay
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=8192, n_positions=64, n_embd=768, n_layer=2, n_head=12)).eval()
    with torch.inference_mode(False), torch.no_grad():
        timings, prefetch = {}, calibrate.decision("prefetch")  # a group of its own, measured before this one
        decisions = {"fp32_rows": _rows_in_c(model, "fp32", timings, prefetch)}
        c_step = Decoder(model)
        now = torch.get_num_threads()
        candidates = sorted({1, now, os.cpu_count() or 1})
        by_threads = _step_times(
            {n: lambda i, p, c, n=n: c_step.run(i, p, c, None, n, prefetch) for n in candidates}, model, 1
        )
        winners = [n for n in candidates if n != now and calibrate.beats(by_threads, n, now)]
        decisions["threads"] = min(winners, key=lambda n: by_threads[n][0]) if winners else 0  # 0: torch's
        timings["threads_step_ms"] = calibrate.best_ms(by_threads)
        decisions["int8_rows"] = _rows_in_c(quantize_model(model), "int8", timings, prefetch)
    return decisions, timings


calibrate.MEASURES["steps"] = measure_steps


__all__ = ["Decoder", "applies", "decoder", "max_rows", "measure_steps"]
