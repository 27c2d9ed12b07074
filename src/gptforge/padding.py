"""Padding and truncation of encoded texts, with the meaning transformers' tokenizers give them:
`Tokenizer.encode_batch(texts, padding=True, truncation=True, max_length=128)` -> input_ids and
attention_mask (1 for a text's tokens, 0 for padding)."""

from __future__ import annotations

from .errors import OptionError

PADDINGS = {False: False, "do_not_pad": False, True: "longest", "longest": "longest", "max_length": "max_length"}


def _check(padding, truncation, max_length, side: str) -> str | bool:
    if padding not in PADDINGS:
        raise OptionError(f"padding={padding!r}: choose True or 'longest' (to the longest text), 'max_length' or False")
    if truncation not in (True, False, "longest_first", "only_first", "do_not_truncate"):
        raise OptionError(f"truncation={truncation!r}: choose True (cut each text to max_length) or False")
    if max_length is not None and not (
        isinstance(max_length, int) and not isinstance(max_length, bool) and max_length > 0
    ):
        raise OptionError(f"max_length={max_length!r}: must be a positive number of tokens")
    if side not in ("right", "left"):
        raise OptionError(f"padding_side={side!r}: choose 'right' or 'left' (left for generating after the texts)")
    mode = PADDINGS[padding]
    if max_length is None and (mode == "max_length" or truncation not in (False, "do_not_truncate")):
        what = "padding='max_length'" if mode == "max_length" else f"truncation={truncation!r}"
        raise OptionError(f"{what} needs max_length= (the number of tokens to keep or pad to)")
    return mode


def pad_batch(
    ids: list[list[int]],
    pad_id: int,
    padding=False,
    truncation=False,
    max_length: int | None = None,
    padding_side: str = "right",
    return_tensors: str | None = None,
) -> dict:
    """{"input_ids", "attention_mask"} of the encoded texts `ids`: cut to `max_length` (truncation keeps the
    start), padded with `pad_id` to the longest text (padding=True) or to `max_length` (padding="max_length")
    on `padding_side`; `return_tensors="pt"` gives torch tensors (which need rows of one length)."""
    mode = _check(padding, truncation, max_length, padding_side)
    if truncation not in (False, "do_not_truncate"):
        ids = [row[:max_length] for row in ids]
    else:
        ids = [list(row) for row in ids]
    width = max(map(len, ids), default=0) if mode == "longest" else max_length if mode == "max_length" else 0
    rows, masks = [], []
    for row in ids:
        pad = [pad_id] * max(0, width - len(row))
        mask = [1] * len(row)
        rows.append(row + pad if padding_side == "right" else pad + row)
        masks.append(mask + [0] * len(pad) if padding_side == "right" else [0] * len(pad) + mask)
    if return_tensors is None:
        return {"input_ids": rows, "attention_mask": masks}
    if return_tensors != "pt":
        raise OptionError(f"return_tensors={return_tensors!r}: gptforge gives 'pt' (torch tensors) or lists (None)")
    if len({len(r) for r in rows}) > 1:
        raise OptionError(
            "return_tensors='pt' needs rows of one length: pass padding=True (or truncation with padding)"
        )
    import torch

    return {"input_ids": torch.tensor(rows, dtype=torch.long), "attention_mask": torch.tensor(masks, dtype=torch.long)}


__all__ = ["PADDINGS", "pad_batch"]
