"""The exact fast encoders behind `Tokenizer.encode_batch`: tiktoken for byte-level BPEs that qualify, a numpy
table for character vocabularies. Each is used only where it gives exactly the ids `tokenizers` gives (the
Tokenizer checks that on PROBE and a sample of its vocabulary before using one)."""

from __future__ import annotations

import json
import re
from functools import lru_cache

import numpy as np

EOS = "<|endoftext|>"
# GPT-2's pre-tokenizer split pattern, as the tokenizers library's ByteLevel pre-tokenizer applies it.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map that byte-level vocabularies are written in.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to code points from 256 up, so
    every token is a readable string in vocab.json.
    """
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# Text on which the fast path must agree with `tokenizers` before it is used (on top of the structural checks).
PROBE = (
    "Hello, world! It's 2024; we've 3.14159 reasons.\n\n\n  indented\tline\r\n"
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。 🙂🚀👩‍👩‍👧 é e\u0301 ﬁ  \u00a0 \u3000 x\n"
    "<|endoftext|>next doc<|endoftext|><|endoftext|>   trailing   \n\n"
    "I'LL don't they're 12345678901234567890 ---=== (([[{{ }}]])) ... ??!! @user #tag http://x.y/z?a=1&b=2\n"
)


# --- fast exact paths -------------------------------------------------------------------------------


def tiktoken_encoding(tok):
    """A tiktoken Encoding giving exactly `tokenizers`' ids for this byte-level BPE, or None.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank; `tokenizers` applies the
    merge with the lowest merge index. Ranks taken as ids agree with merge order when every non-byte token
    is the result of exactly one merge and ids increase with merge index, which is what BPE training
    produces (GPT-2's own vocabulary included). Anything else -- a normalizer, a pre-tokenizer other than
    GPT-2's ByteLevel regex, added tokens besides `<|endoftext|>`, dropout, suffixes, byte fallback, ids out of
    merge order -- falls back to `tokenizers`. A final check encodes varied probe text and a sample of the
    vocabulary with both and keeps tiktoken only if the ids agree.
    """
    try:
        import tiktoken
    except ImportError:
        return None
    spec, model = tok.spec, tok.spec["model"]
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
        pre = pre["pretokenizers"][0]
    if (
        spec.get("normalizer") is not None
        or pre.get("type") != "ByteLevel"
        or pre.get("add_prefix_space")
        or not pre.get("use_regex", True)
        or model.get("dropout")
        or model.get("continuing_subword_prefix")
        or model.get("end_of_word_suffix")
        or model.get("byte_fallback")
        or [t["content"] for t in spec.get("added_tokens", [])] != [EOS]
    ):
        return None
    inverse = {c: b for b, c in byte_to_unicode().items()}
    vocab: dict[str, int] = model["vocab"]
    ranks: dict[bytes, int] = {}
    for token, i in vocab.items():
        if token == EOS:
            continue
        if not all(c in inverse for c in token):
            return None
        ranks[bytes(inverse[c] for c in token)] = i
    if len(ranks) != len(vocab) - (EOS in vocab) or sum(len(b) == 1 for b in ranks) != 256:
        return None
    last = max(i for b, i in ranks.items() if len(b) == 1)
    for m in model["merges"]:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        i = vocab.get(a + b)
        if i is None or i <= last or i <= vocab.get(a, -1) or i <= vocab.get(b, -1):
            return None
        last = i
    if len(model["merges"]) != len(ranks) - 256:
        return None
    return tiktoken.Encoding(
        f"gptforge-{tok.fingerprint}", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOS: tok.eos_id}
    )


def char_table(tok):
    """(code point -> id table, special-token split regex) for a char vocabulary built like ours, or None."""
    spec = tok.spec
    pre = json.dumps(spec.get("pre_tokenizer"))
    if spec.get("normalizer") is not None or _CHAR_SPLIT not in pre or tok.unk_id is None:
        return None
    table = np.full(0x110000, tok.unk_id, dtype=np.int64)
    for token, i in spec["model"]["vocab"].items():
        if len(token) == 1:
            table[ord(token)] = i
    specials = [t["content"] for t in spec.get("added_tokens", [])]
    split = "(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")"
    return table, split


_CHAR_SPLIT = "[\\\\s\\\\S]"  # the character-isolating regex, as it appears in tokenizer.json


__all__ = ["GPT2_PATTERN", "PROBE", "byte_to_unicode", "char_table", "tiktoken_encoding"]
