"""Tokenizers: train a byte-level BPE or a character vocabulary, load any GPT-2-style tokenizer, encode fast.

Two kinds, both stored as a `tokenizers` library `tokenizer.json` that transformers' AutoTokenizer opens:

* **bpe** -- GPT-2's byte-level BPE (ByteLevel pre-tokenizer with GPT-2's split regex, no prefix space).
  `<|endoftext|>` is the only special token and serves as bos, eos and unk, as in GPT-2. Tokenizers we train
  put it at id 0 (the small presets in config.py use bos = eos = 0); OpenAI's GPT-2 has it at 50256.
* **char** -- one token per Unicode code point, for Chinese and other scripts where a character is the
  natural unit: a WordLevel model behind a pre-tokenizer that isolates every character. Id 0 is
  `<|endoftext|>`, id 1 is `<|unk|>`. **Unseen-character policy:** a character that was not kept at
  training time (never seen, or seen fewer than `min_frequency` times, or beyond `vocab_size`) encodes as
  `<|unk|>` and decodes as the literal text `<|unk|>`; nothing is dropped silently and the sequence
  length still equals the number of characters.

Bulk encoding is the bottleneck of data preparation, so `encode_batch` takes the fastest path that gives
exactly the ids `tokenizers` gives: tiktoken for byte-level BPEs that qualify (see `fastencode.tiktoken_encoding`),
a numpy table lookup for char vocabularies, and `tokenizers` itself otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .errors import NotFoundError, TokenizerError
from .fastencode import EOS, PROBE, byte_to_unicode, char_table, tiktoken_encoding

UNK = "<|unk|>"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


class Tokenizer:
    """One object for both kinds: encode, decode, special tokens, save, fingerprint.

    Wraps a `tokenizers.Tokenizer`; it pickles as its JSON so worker processes can rebuild it.
    """

    def __init__(self, hf_tokenizer, source: str = "<memory>"):
        self._hf = hf_tokenizer
        self.source = source
        spec = json.loads(hf_tokenizer.to_str())
        model = spec.get("model") or {}
        if model.get("type") == "BPE":
            self.kind = "bpe"
        elif model.get("type") == "WordLevel":
            self.kind = "char"
        else:
            raise TokenizerError(
                f"{source}: a {model.get('type')} tokenizer is not supported; gptforge uses byte-level BPE or char "
                "vocabularies"
            )
        eos = hf_tokenizer.token_to_id(EOS)
        if eos is None:
            raise TokenizerError(
                f"{source}: the vocabulary has no {EOS} token; GPT-2 tokenizers need it as end of text"
            )
        self.eos_id: int = eos
        self.bos_id = self.unk_id = eos
        if self.kind == "char":
            self.unk_id = hf_tokenizer.token_to_id(UNK)
        self.vocab_size: int = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        self._spec = spec
        self.fingerprint: str = _fingerprint(spec)
        # tokenizer_config.json entries of the folder it came from that saving keeps (pad token, chat template, ...)
        self.meta: dict = {}
        self._fast = None  # built lazily: tiktoken Encoding, char lookup table, or False (use tokenizers)

    # --- pickling: workers rebuild from JSON ---
    def __getstate__(self):
        return {"json": self._hf.to_str(), "source": self.source}

    def __setstate__(self, state):
        from tokenizers import Tokenizer as HFTokenizer

        self.__init__(HFTokenizer.from_str(state["json"]), state["source"])

    def __repr__(self) -> str:
        return (
            f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id}, fast={self.fast_path})"
        )

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def spec(self) -> dict:
        """The tokenizer.json contents (model, added tokens, pre-tokenizer), as a dict."""
        return self._spec

    @property
    def hf_tokenizer(self):
        """The underlying `tokenizers.Tokenizer` (the reference implementation)."""
        return self._hf

    @property
    def fast_path(self) -> str:
        """Which exact encoder `encode_batch` uses: "tiktoken", "char-table" or "tokenizers"."""
        self._ensure_fast()
        if self._fast is False:
            return "tokenizers"
        return "char-table" if self.kind == "char" else "tiktoken"

    # --- encoding ---
    def _ensure_fast(self) -> None:
        if self._fast is None:
            self._fast = (char_table(self) if self.kind == "char" else tiktoken_encoding(self)) or False
            if self._fast is not False:  # the structural checks passed; now the ids themselves must agree
                vocab = sorted(self._hf.get_vocab().items(), key=lambda kv: kv[1])
                sample = [t for t, _ in vocab[:: max(1, len(vocab) // 4000)]]
                probe = [PROBE, self.decode_tokens(sample, " "), self.decode_tokens(sample, "")]
                if self.encode_batch(probe) != self.reference_encode_batch(probe):
                    self._fast = False

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; a literal `<|endoftext|>` in the text becomes `eos_id`, as in `tokenizers`."""
        return self.encode_batch([text])[0]

    def encode_batch(
        self,
        texts: Sequence[str],
        num_threads: int = 1,
        *,
        padding=False,
        truncation=False,
        max_length: int | None = None,
        padding_side: str = "right",
        return_tensors: str | None = None,
    ):
        """Ids of many texts at once, through the fastest path proven identical to `tokenizers`. With padding,
        truncation, max_length or return_tensors (as transformers' tokenizers mean them), a dict of input_ids
        and attention_mask instead, padded with `pad_id` (gptforge.padding)."""
        if padding or truncation or max_length is not None or return_tensors is not None:
            from .padding import pad_batch

            return pad_batch(
                self.encode_batch(texts, num_threads),
                self.pad_id,
                padding,
                truncation,
                max_length,
                padding_side,
                return_tensors,
            )
        self._ensure_fast()
        if self._fast is False:
            return [e.ids for e in self._hf.encode_batch(list(texts), add_special_tokens=False)]
        if self.kind == "char":
            return [self._char_encode(t).tolist() for t in texts]
        if num_threads <= 1:  # tiktoken's batch call always starts a thread pool; skip it
            return [self._fast.encode(t, allowed_special={EOS}) for t in texts]
        return self._fast.encode_batch(list(texts), allowed_special={EOS}, num_threads=num_threads)

    def encode_array(self, text: str) -> np.ndarray:
        """Ids of one (long) text as an int64 numpy array, skipping Python lists where possible."""
        self._ensure_fast()
        if self._fast is False:
            return np.asarray(self.reference_encode_batch([text])[0], dtype=np.int64)
        if self.kind == "char":
            return self._char_encode(text)
        return self._fast.encode_to_numpy(text, allowed_special={EOS}).astype(np.int64)  # no list, no thread pool

    def reference_encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids from the `tokenizers` library itself, the reference the fast paths are checked against."""
        return [e.ids for e in self._hf.encode_batch(list(texts), add_special_tokens=False)]

    def _char_encode(self, text: str) -> np.ndarray:
        table, specials = self._fast
        parts = re.split(specials, text)
        out = []
        for i, part in enumerate(parts):
            if i % 2:  # a special token captured by the split
                out.append(np.array([self._hf.token_to_id(part)], dtype=np.int64))
            elif part:
                codes = np.frombuffer(part.encode("utf-32-le", "surrogatepass"), dtype="<u4")
                out.append(table[codes])
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def decode_tokens(self, tokens: list[str], sep: str) -> str:
        """Text of vocabulary entries joined by `sep` (for probing the fast path with every kind of token)."""
        return sep.join(self._hf.decode([self._hf.token_to_id(t)]) for t in tokens)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    @property
    def pad_token(self) -> str:
        """The padding token: the one the folder declared, else the end-of-text token (as GPT-2 pads)."""
        pad = self.meta.get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        return pad if isinstance(pad, str) and self._hf.token_to_id(pad) is not None else EOS

    @property
    def pad_id(self) -> int:
        return self._hf.token_to_id(self.pad_token)

    @property
    def special_tokens(self) -> list[str]:
        """The special tokens besides <|endoftext|> and <|unk|> (`train_tokenizer(special_tokens=...)`)."""
        return [
            t["content"]
            for t in self._spec.get("added_tokens", [])
            if t.get("special") and t["content"] not in (EOS, UNK)
        ]

    def token_byte_lengths(self) -> np.ndarray:
        """UTF-8 length of each token id's text (0 for special tokens): bytes of a token array without decoding."""
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        inverse = {c: b for b, c in byte_to_unicode().items()}
        specials = {t["id"] for t in self._spec.get("added_tokens", []) if t.get("special")}
        for token, i in self._hf.get_vocab(with_added_tokens=True).items():
            if i in specials or i >= self.vocab_size:
                continue
            lengths[i] = (
                len(token) if (self.kind == "bpe" and all(c in inverse for c in token)) else len(token.encode())
            )
        return lengths

    # --- files ---
    def save(self, folder: str | os.PathLike, model_max_length: int | None = None) -> None:
        """Write tokenizer.json, vocab.json, merges.txt (bpe), tokenizer_config.json, special_tokens_map.json.

        transformers' AutoTokenizer opens the folder and gives the same ids; each file is replaced atomically.
        """
        from .fsio import atomic_write

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        model = self._spec["model"]
        vocab = dict(sorted(self._hf.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1]))
        unk = UNK if self.kind == "char" else EOS
        specials = {"bos_token": EOS, "eos_token": EOS, "unk_token": unk, "pad_token": self.pad_token}
        if self.special_tokens:  # so that transformers' tokenizer knows them as special tokens
            specials["additional_special_tokens"] = self.special_tokens
        # the model's context, or a smaller limit the folder it came from declared
        limits = [n for n in (model_max_length, self.meta.get("model_max_length")) if isinstance(n, int) and n > 0]
        config = {
            # GPT2Tokenizer rebuilds the exact byte-level BPE; a char vocabulary loads as a generic fast tokenizer.
            "tokenizer_class": "GPT2Tokenizer" if self.kind == "bpe" else "PreTrainedTokenizerFast",
            **specials,
            "add_prefix_space": False,
            "add_bos_token": False,
            "model_max_length": min(limits, default=1024),
            "clean_up_tokenization_spaces": False,
        }
        if self.meta.get("chat_template"):
            config["chat_template"] = self.meta["chat_template"]

        def text(s: str):
            return lambda p: Path(p).write_text(s, encoding="utf-8")

        atomic_write(folder / "tokenizer.json", text(self._hf.to_str(pretty=True)))
        atomic_write(folder / "vocab.json", text(json.dumps(vocab, ensure_ascii=False) + "\n"))
        if self.kind == "bpe":
            merges = ["#version: 0.2"] + [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
            atomic_write(folder / "merges.txt", text("\n".join(merges) + "\n"))
        atomic_write(folder / "tokenizer_config.json", text(json.dumps(config, indent=2) + "\n"))
        atomic_write(folder / "special_tokens_map.json", text(json.dumps(specials, indent=2) + "\n"))


def _fingerprint(spec: dict) -> str:
    """Hash of what decides the ids (model vocab/merges, added tokens, pre-tokenizer), not of file formatting."""
    model = spec.get("model") or {}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    key = {
        "type": model.get("type"),
        "vocab": sorted((model.get("vocab") or {}).items(), key=lambda kv: kv[1]),
        "merges": merges,
        "added": [(t["id"], t["content"], bool(t.get("special"))) for t in spec.get("added_tokens", [])],
        "normalizer": spec.get("normalizer"),
        "pre_tokenizer": spec.get("pre_tokenizer"),
    }
    return hashlib.sha256(json.dumps(key, ensure_ascii=False, sort_keys=True).encode()).hexdigest()[:16]


# --- building ----------------------------------------------------------------------------------------


def _bpe_from_vocab_merges(vocab_file: Path, merges_file: Path):
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    for f in (vocab_file, merges_file):
        if not f.is_file():
            raise NotFoundError(f"{f}: no such file; a GPT-2 tokenizer needs vocab.json and merges.txt side by side")
    try:
        vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{vocab_file}: not a JSON vocabulary ({e})") from None
    merges = []
    for n, line in enumerate(merges_file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or (n == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise TokenizerError(f"{merges_file}:{n}: expected two tokens separated by one space, got {line!r}")
        merges.append((parts[0], parts[1]))
    if EOS not in vocab:
        raise TokenizerError(
            f"{vocab_file}: the vocabulary has no {EOS} token; GPT-2 tokenizers need it as end of text"
        )
    hf = HFTokenizer(models.BPE(vocab, merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(EOS, special=True, normalized=False)])
    return hf


def load_tokenizer(path: str | os.PathLike, merges_file: str | os.PathLike | None = None) -> Tokenizer:
    """Open a tokenizer folder, a `tokenizer.json`, or a `vocab.json` (+ `merges.txt`) pair.

    A folder written by gptforge or transformers (including a pretrained GPT-2 folder) is read from its
    `tokenizer.json`, or from `vocab.json` + `merges.txt` when that is all it has.
    """
    from tokenizers import Tokenizer as HFTokenizer

    path = Path(path)
    if isinstance(path, Path) and not path.exists():
        raise NotFoundError(f"{path}: no such tokenizer folder or file")
    if path.is_dir():
        if (path / "tokenizer.json").is_file() and merges_file is None:
            path = path / "tokenizer.json"
        elif (path / "vocab.json").is_file():
            path = path / "vocab.json"
        else:
            raise NotFoundError(
                f"{path}: no tokenizer here (looked for tokenizer.json, vocab.json + merges.txt); "
                "train one with `gptforge tokenizer train`"
            )
    if path.name.endswith(".json") and merges_file is None and path.name != "vocab.json":
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise TokenizerError(f"{path}: not a tokenizers tokenizer.json ({str(e).splitlines()[0][:200]})") from None
        tok = Tokenizer(hf, str(path))
    else:
        merges = Path(merges_file) if merges_file is not None else path.with_name("merges.txt")
        tok = Tokenizer(_bpe_from_vocab_merges(path, merges), str(path))
    tok.meta = _folder_meta(path.parent)
    return tok


def _folder_meta(folder: Path) -> dict:
    """What a tokenizer folder declares beyond the vocabulary and that saving keeps: pad token, chat template,
    model_max_length (from tokenizer_config.json, or chat_template.jinja)."""
    from .chat import read_chat_template

    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    meta = (
        {k: config[k] for k in ("pad_token", "model_max_length") if config.get(k) is not None}
        if isinstance(config, dict)
        else {}
    )
    template = read_chat_template(folder)
    if template:
        meta["chat_template"] = template
    return meta


def check_vocab_fits(tokenizer: Tokenizer, model_vocab_size: int, what: str = "the model") -> None:
    """Raise if the tokenizer can produce ids the model's embedding table does not have."""
    if tokenizer.vocab_size > model_vocab_size:
        raise TokenizerError(
            f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} tokens but {what} has "
            f"vocab_size={model_vocab_size}; "
            f"build the model with vocab_size >= {tokenizer.vocab_size} (e.g. --vocab-size {tokenizer.vocab_size}) "
            "or use the tokenizer the model was trained with"
        )


__all__ = [
    "EOS",
    "UNK",
    "Tokenizer",
    "TokenizerError",
    "check_vocab_fits",
    "load_tokenizer",
]
