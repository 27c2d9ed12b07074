"""A static batch of sequences through the model: the decoding step that `generate_ids` (sampling) and beam search
(beams.py) share. Prompts are left-padded and prefilled together; each step appends one token per row and runs the
model once, through the C step where it applies (fastdecode.py); past the context the window slides."""

from __future__ import annotations

import torch

from .inference.fastdecode import decoder
from .model import GPT


class StaticBatch:
    """A static batch of sequences through the model: left-padded prompts prefilled together, then one new token
    per row per step (`advance`), in one C call where it applies (fastdecode.py). When a row reaches the model's
    context, the window slides: the last `keep` tokens are kept and their cache is recomputed, so the model always
    sees positions it was trained on. `reorder` keeps chosen rows (beam search follows its beams with it)."""

    def __init__(self, model: GPT, prompts: list[list[int]], pad: int, max_new: int, keep: int):
        self.model, self.keep = model, keep
        device = model.transformer.wte.weight.device
        B, T0 = len(prompts), max(len(p) for p in prompts)
        self.padded = any(len(p) < T0 for p in prompts)
        total = T0 + max_new
        # Every token so far (left-padded), and which are real: needed to rebuild the cache when sliding.
        self.tokens = torch.full((B, total), pad, dtype=torch.long, device=device)
        self.real = torch.zeros((B, total), dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            self.tokens[i, T0 - len(p) : T0] = torch.tensor(p, device=device)
            self.real[i, T0 - len(p) : T0] = True
        self.real[:, T0:] = True
        self.cache = model.new_cache(B, min(model.config.n_positions, total))
        self.step_in_c = decoder(model, B)
        self.prompt_end = self.col = T0  # `col`: where the next token goes
        self.start = 0  # column of `tokens` where the cached window begins
        self.logits = self._prefill(T0)  # (B, V): the next token's logits of each row

    def _prefill(self, end: int) -> torch.Tensor:
        """(Re)compute the cache for tokens[start:end]; the last position's logits."""
        self.cache.length = 0
        mask = self.real[:, self.start : end]
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        logits, _ = self.model(
            self.tokens[:, self.start : end],
            cache=self.cache,
            position_ids=pos,
            attention_mask=mask if self.padded else None,
            logits_to_keep=1,
        )
        self.next_pos = pos[:, -1:] + 1
        return logits[:, -1]

    def advance(self, nxt: torch.Tensor) -> torch.Tensor:
        """Append one token per row (B,); returns (and keeps in `logits`) the logits that follow."""
        col = self.col
        self.tokens[:, col] = nxt
        self.col += 1
        if col + 1 - self.start > self.cache.max_len:  # the context is full: slide the window
            self.start = col + 1 - self.keep
            self.logits = self._prefill(col + 1)
            return self.logits
        mask = self.real[:, self.start : col + 1] if self.padded else None
        if self.step_in_c is not None:
            self.logits = self.step_in_c(nxt, self.next_pos, self.cache, mask)
        else:
            logits, _ = self.model(
                nxt[:, None], cache=self.cache, position_ids=self.next_pos, attention_mask=mask, logits_to_keep=1
            )
            self.logits = logits[:, -1]
        self.next_pos = self.next_pos + 1
        return self.logits

    def reorder(self, index: torch.Tensor) -> None:
        """Row i becomes the old row index[i] (tokens, padding, positions and KV cache)."""
        self.tokens, self.real = self.tokens.index_select(0, index), self.real.index_select(0, index)
        self.next_pos = self.next_pos.index_select(0, index)
        self.cache.reorder(index)
        self.logits = self.logits.index_select(0, index)

    def generated(self) -> torch.Tensor:
        """(B, tokens so far): each row's new tokens."""
        return self.tokens[:, self.prompt_end : self.col]
