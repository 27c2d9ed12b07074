"""The GPT-2 network.

Module and parameter names follow transformers' GPT2LMHeadModel (`transformer.h.0.attn.c_attn.weight`, ...)
so that a state dict maps one to one; the only difference is that our projections are `nn.Linear`
(weight stored (out, in)) where transformers uses Conv1D (weight stored (in, out)). `checkpoint.py`
transposes those on the way in and out. The products and the loss head go through `kernels.py`, which
holds the CPU fast paths; this file is the network alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import GPTConfig
from .kernels import Dropout, Linear, attention, gelu_tanh, linear_cross_entropy


def _activation(name: str):
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return gelu_tanh  # GPT-2's tanh approximation of GELU
    if name == "gelu":
        return F.gelu
    if name == "relu":
        return F.relu
    if name == "relu2":
        return lambda x: F.relu(x).square()  # squared ReLU (transformers' "relu2")
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


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head = config.n_head
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.attn_dropout = config.attn_pdrop
        self.resid_dropout = Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        # Plain causal attention needs no mask tensor: SDPA picks its fastest kernel for is_causal.
        is_causal = mask is None and k.size(2) == T and T > 1
        y = attention(q, k, v, mask, dropout_p=self.attn_dropout if self.training else 0.0, is_causal=is_causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, config.mlp_width)
        self.c_proj = Linear(config.mlp_width, config.n_embd)
        self.act = _activation(config.activation_function)
        self.dropout = Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.c_fc(x)
        fused = getattr(self.c_proj, "after_activation", None)  # a LoRA c_proj: recomputes act(u), not keeps it
        return self.dropout(fused(u, self.act) if fused else self.c_proj(self.act(u)))


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
        self.drop = Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)


class GPT(nn.Module):
    """GPT-2 language model (transformers' GPT2LMHeadModel), output head tied to the token embedding
    (or not, with `tie_word_embeddings=False`)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie_weights()
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

    def tie_weights(self) -> None:
        """The output head shares wte's tensor (GPT-2's choice; again after loading with assign=True, which
        replaces it), unless the config unties them (`tie_word_embeddings=False`: a matrix of its own)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, tied head counted once; `non_embedding` leaves out wte, wpe and an untied head. An int8
        model (whose weights are buffers, its head a copy of wte) counts as the fp32 model it was made from."""
        if any(b.dtype == torch.int8 for b in self.buffers()):
            return self.config.num_params(non_embedding)
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
            if not self.config.tie_word_embeddings:
                n -= self.lm_head.weight.numel()
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
        x = self.hidden(input_ids, cache=cache, position_ids=position_ids, attention_mask=attention_mask)
        if targets is not None:
            return None, linear_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.flatten())
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return self.lm_head(x), None

    def hidden(
        self,
        input_ids: torch.Tensor,
        *,
        cache: KVCache | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The body's output (B, T, n_embd) after the final LayerNorm (transformers' GPT2Model): what the
        LM head and the classification head (`classify.py`) read. Arguments as in `forward`."""
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if past + T > self.config.n_positions:
            raise ValueError(
                f"sequence of {past + T} tokens is longer than the model's context "
                f"n_positions={self.config.n_positions}"
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
        return tr.ln_f(x)

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
