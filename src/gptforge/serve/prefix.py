"""The prefix cache: keys and values of prompt prefixes the server has already prefilled, reused by later prompts
that start the same way (a system prompt, a few-shot block), so that only the rest of the prompt is computed.

The cache holds blocks of `BLOCK` tokens. A block's key is a hash of every token from the start of the prompt to
the block's end (and of the adapter the prompt runs under, whose keys and values differ), so a block is found only
behind the very same prefix: its keys and values, which depend on nothing else (attention is causal and position
ids count from the prompt's first token), are what the prompt would compute. Memory is bounded: beyond `max_bytes`
the least recently used blocks go first, and since a hit touches a prefix's blocks from its end to its start, a
prefix loses its last blocks before its first ones (a first block is never left without its followers' use).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

import torch

BLOCK = 16  # tokens per cached block


class PrefixCache:
    """Blocks of cached keys and values, (n_layer, heads, BLOCK, head_dim) each, by prefix hash, least recently used
    first. `queries` and `hits` count the prompt tokens looked up and found (what the metrics report)."""

    def __init__(self, max_bytes: int, block: int = BLOCK):
        self.max_bytes, self.block = max_bytes, block
        self.blocks: OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.bytes = 0
        self.queries = self.hits = 0

    def keys(self, prompt: list[int], salt: int = 0) -> list[bytes]:
        """The key of each whole block of `prompt`: a hash of everything up to the block's end."""
        h = hashlib.blake2b(str(salt).encode(), digest_size=16)
        out = []
        for end in range(self.block, len(prompt) + 1, self.block):
            h.update(array("q", prompt[end - self.block : end]).tobytes())
            out.append(h.copy().digest())
        return out

    def lookup(self, prompt: list[int], salt: int = 0) -> tuple[list[bytes], int]:
        """The cached blocks that begin `prompt`, and how many of its tokens they give: never the last token, whose
        logits the prompt needs."""
        found = []
        for key in self.keys(prompt[:-1], salt):
            if key not in self.blocks:
                break
            found.append(key)
        for key in reversed(found):  # the first block ends up the most recently used
            self.blocks.move_to_end(key)
        return found, min(len(found) * self.block, len(prompt) - 1)

    def count(self, prompt_tokens: int, cached: int) -> None:
        self.queries += prompt_tokens
        self.hits += cached

    def copy_into(self, found: list[bytes], tokens: int, k: list[torch.Tensor], v: list[torch.Tensor], row, col):
        """Write the first `tokens` cached tokens of `found` into row `row` of the per-layer buffers `k` and `v`
        ((rows, heads, columns, head_dim) each), from column `col`. Block by block and layer by layer: joining
        the blocks first would allocate and fill one more copy of them all."""
        for j, key in enumerate(found):
            n = min(self.block, tokens - j * self.block)
            if n <= 0:
                break
            at = col + j * self.block
            block_k, block_v = self.blocks[key]
            for layer in range(len(k)):
                k[layer][row, :, at : at + n] = block_k[layer, :, :n]
                v[layer][row, :, at : at + n] = block_v[layer, :, :n]

    def store(self, prompt: list[int], salt: int, k: list[torch.Tensor], v: list[torch.Tensor], row, col) -> None:
        """Keep the whole blocks of a prompt just prefilled into row `row` from column `col`, evicting the least
        recently used blocks beyond the bound."""
        keys = self.keys(prompt, salt)
        new = [j for j, key in enumerate(keys) if key not in self.blocks]
        size = 2 * k[0][0, :, : self.block].numel() * len(k) * k[0].element_size()
        if not new or size > self.max_bytes:
            return
        for j in new:
            at = col + j * self.block
            block_k = torch.stack([t[row, :, at : at + self.block] for t in k])
            block_v = torch.stack([t[row, :, at : at + self.block] for t in v])
            self.blocks[keys[j]] = (block_k, block_v)
            self.bytes += size
        for key in reversed(keys):  # the first block ends up the most recently used
            self.blocks.move_to_end(key)
        while self.bytes > self.max_bytes:
            self.blocks.popitem(last=False)
            self.bytes -= size
