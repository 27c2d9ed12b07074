"""Training a tokenizer on an iterable of texts: GPT-2's byte-level BPE (tokenizers' trainer) or one token per
character. Reading files for it is data/vocabulary.py's job (`gptforge.train_tokenizer`)."""

from __future__ import annotations

import re
from typing import Iterable, Sequence

from .errors import TokenizerError
from .fastencode import EOS
from .options import DEFAULT_VOCAB_SIZE
from .tokenizer import UNK, Tokenizer

MAX_VOCAB = 2**22  # 4M tokens: far above any GPT-2 vocabulary, far below what the trainer cannot allocate


def check_training(kind: str, vocab_size: int, min_frequency: int, special_tokens, pad_token) -> list[str]:
    """Tokenizer training's arguments, refused by name before any text is read; the extra special tokens."""
    specials = _check_specials(special_tokens, pad_token)
    vocab_size -= len(specials)
    if kind not in ("bpe", "char"):
        raise TokenizerError(f"kind={kind!r} is not a tokenizer kind; choose 'bpe' or 'char'")
    if not isinstance(vocab_size, int) or vocab_size < (258 if kind == "bpe" else 3):
        raise TokenizerError(
            f"vocab_size={vocab_size} is too small for a {kind} tokenizer; "
            f"use at least {258 if kind == 'bpe' else 3} (e.g. --vocab-size {DEFAULT_VOCAB_SIZE})"
        )
    if vocab_size > MAX_VOCAB:  # the trainer would try to allocate for it (1e9 aborts the process)
        raise TokenizerError(
            f"vocab_size={vocab_size:,} is more than {MAX_VOCAB:,} tokens; GPT-2 has 50,257 (e.g. --vocab-size "
            f"{DEFAULT_VOCAB_SIZE})"
        )
    if not (isinstance(min_frequency, int) and 1 <= min_frequency < 2**32):
        raise TokenizerError(f"min_frequency={min_frequency} must be a whole number from 1 to 2**32 - 1")
    return specials


def _check_specials(tokens: Sequence[str], pad_token: str | None) -> list[str]:
    """The extra special tokens asked for, in order, once each (a pad token that is not among them joins them)."""
    if isinstance(tokens, str):
        tokens = [tokens]
    tokens = [*tokens, *([pad_token] if pad_token is not None else [])]
    for t in tokens:
        if not isinstance(t, str) or not t or t.isspace():
            raise TokenizerError(
                f"special_tokens: {t!r} is not a token; give non-empty strings such as '<|startoftext|>'"
            )
    return [t for t in dict.fromkeys(tokens) if t not in (EOS, UNK)]


def train_from_texts(
    texts: Iterable[str],
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    min_frequency: int = 2,
    kind: str = "bpe",
    *,
    special_tokens: Sequence[str] = (),
    pad_token: str | None = None,
    where: str = "texts",
) -> Tokenizer:
    """Train a byte-level BPE (`kind="bpe"`) or a character vocabulary (`kind="char"`) on an iterable of texts,
    in memory (`Tokenizer.save` writes it). `<|endoftext|>` gets id 0, the `special_tokens` the ids after it;
    `where` names the texts in errors. Ctrl-C stops reading and raises KeyboardInterrupt. Reading files is
    `gptforge.train_tokenizer`'s job (data/vocabulary.py)."""
    import threading

    from .faults import run_interruptibly

    specials = check_training(kind, vocab_size, min_frequency, special_tokens, pad_token)
    stop = threading.Event()
    seen = [0]  # characters read, to tell no text from too little

    def counted():
        for text in texts:
            if stop.is_set():
                return
            seen[0] += len(text)
            yield text

    if kind == "bpe":
        hf, trainer = _bpe_trainer(vocab_size, min_frequency, specials)
        run_interruptibly(lambda: hf.train_from_iterator(counted(), trainer), stop)
    else:
        hf = _char_vocabulary(counted(), vocab_size, min_frequency, specials)
    tok = Tokenizer(hf, source=f"trained {kind}")
    if pad_token is not None:
        tok.meta["pad_token"] = pad_token
    if tok.vocab_size - len(specials) <= (257 if kind == "bpe" else 2):  # bytes + <|endoftext|>; + <|unk|>
        if not seen[0]:
            raise TokenizerError(f"no text to train on in {where}; give files with text")
        what = "pair of symbols" if kind == "bpe" else "character"
        raise TokenizerError(
            f"{where}: too little text ({seen[0]:,} characters) for a {kind} tokenizer: no {what} occurs "
            f"{min_frequency} times (--min-frequency); give more text, or lower --min-frequency"
        )
    return tok


def _bpe_trainer(vocab_size: int, min_frequency: int, specials: list[str]):
    """An empty GPT-2 byte-level BPE and the trainer that fills it."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS, *specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    return hf, trainer


def _char_vocabulary(texts: Iterable[str], vocab_size: int, min_frequency: int, specials: list[str]):
    """One token per character seen `min_frequency` times (the most frequent first), `<|unk|>` for the rest."""
    from collections import Counter

    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    counts: Counter = Counter()
    for t in texts:
        counts.update(re.sub("|".join(map(re.escape, [EOS, *specials])), "", t))
    kept = [c for c, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if n >= min_frequency]
    chars = sorted(kept[: vocab_size - 2 - len(specials)])
    vocab = {t: i for i, t in enumerate([EOS, UNK, *specials, *chars])}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token=UNK))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    hf.decoder = decoders.Fuse()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (EOS, UNK, *specials)])
    return hf


__all__ = ["MAX_VOCAB", "check_training", "train_from_texts"]
