"""Tokenizers: training, files transformers opens, loading every layout, and the exact fast encoding paths."""

from __future__ import annotations

import json
import pickle
import random

import pytest

from gptforge.data.vocabulary import train_tokenizer
from gptforge.tokenizer import EOS, UNK, Tokenizer, TokenizerError, check_vocab_fits, load_tokenizer

VARIED = [
    "Hello, world! It's 2024 and we've got 3.14159 reasons.",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "emoji 🙂🚀👩‍👩‍👧 and flags 🇫🇷, accents é e\u0301 ﬁ",
    "runs   of    spaces\t\ttabs\n\n\n\nnewlines \r\n and trailing   ",
    "digits 1234567890 0.5 1e-9 42nd",
    "one<|endoftext|>two<|endoftext|><|endoftext|> three",
    "",
    " ",
    "\n",
    "I'LL don't THEY'RE it's 's 'll",
]


def random_texts(n: int, seed: int = 0) -> list[str]:
    """Random strings over an alphabet that mixes scripts, whitespace, punctuation and the special token."""
    rng = random.Random(seed)
    pieces = list("abcdefghij ABC  \n\t.,;'!?0123456789") + [
        "的",
        "是",
        "月",
        "🙂",
        "é",
        "'s",
        " the",
        "\n\n",
        EOS,
        "  ",
    ]
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 200))) for _ in range(n)]


@pytest.fixture(scope="module")
def bpe(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe")
    return train_tokenizer([corpus], vocab_size=600, out_dir=out), out


def test_train_bpe_writes_gpt2_files(bpe):
    tok, out = bpe
    assert tok.kind == "bpe" and tok.eos_id == 0 and tok.bos_id == 0
    assert 258 < tok.vocab_size <= 600
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).is_file(), name
    vocab = json.loads((out / "vocab.json").read_text())
    assert vocab[EOS] == 0 and len(vocab) == tok.vocab_size
    merges = (out / "merges.txt").read_text().splitlines()
    assert merges[0].startswith("#version") and len(merges) - 1 == tok.vocab_size - 257
    special = json.loads((out / "special_tokens_map.json").read_text())
    assert special == {"bos_token": EOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}


def test_bpe_roundtrip_and_eos_inside_text(bpe):
    tok, _ = bpe
    for text in VARIED:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("a<|endoftext|>b")
    assert ids.count(tok.eos_id) == 1 and len(ids) == 3


def test_autotokenizer_gives_same_ids(bpe):
    transformers = pytest.importorskip("transformers")
    tok, out = bpe
    auto = transformers.AutoTokenizer.from_pretrained(out)
    assert auto.eos_token_id == tok.eos_id == auto.bos_token_id
    for text in VARIED + random_texts(30):
        assert auto(text)["input_ids"] == tok.encode(text), text
    assert auto.decode(tok.encode(VARIED[2])) == VARIED[2]


def test_tiktoken_path_identical_to_tokenizers(bpe):
    tok, _ = bpe
    assert tok.fast_path == "tiktoken"
    texts = VARIED + random_texts(300, seed=1) + ["\n".join(VARIED) * 20]
    assert tok.encode_batch(texts) == tok.reference_encode_batch(texts)


def test_fallback_when_tiktoken_cannot_be_proven(bpe, tmp_path):
    """Extra added tokens or a normalizer disqualify tiktoken; ids must still equal tokenizers'."""
    from tokenizers import AddedToken, normalizers

    tok, _ = bpe
    hf = tok.hf_tokenizer.__class__.from_str(tok.hf_tokenizer.to_str())
    hf.add_special_tokens([AddedToken("<|pad|>", special=True)])
    extra = Tokenizer(hf)
    assert extra.fast_path == "tokenizers"
    texts = VARIED + ["x<|pad|>y"]
    assert extra.encode_batch(texts) == [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]

    hf2 = tok.hf_tokenizer.__class__.from_str(tok.hf_tokenizer.to_str())
    hf2.normalizer = normalizers.Lowercase()
    lower = Tokenizer(hf2)
    assert lower.fast_path == "tokenizers"
    assert lower.encode("ABC def") == lower.encode("abc def")


def test_ids_out_of_merge_order_fall_back(bpe, tmp_path):
    """A vocabulary whose ids do not follow merge order cannot use ranks = ids; the check must notice."""
    tok, out = bpe
    vocab = json.loads((out / "vocab.json").read_text())
    merged = [t for t, i in sorted(vocab.items(), key=lambda kv: kv[1]) if i >= 257]
    a, b = merged[0], merged[-1]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text((out / "merges.txt").read_text())
    swapped = load_tokenizer(tmp_path / "vocab.json")
    assert swapped.fast_path == "tokenizers"
    assert swapped.encode_batch(VARIED) == swapped.reference_encode_batch(VARIED)


def test_load_every_layout(bpe, tmp_path):
    tok, out = bpe
    text = " ".join(VARIED)
    expected = tok.encode(text)
    assert load_tokenizer(out).encode(text) == expected
    assert load_tokenizer(out / "tokenizer.json").encode(text) == expected
    assert load_tokenizer(out / "vocab.json", out / "merges.txt").encode(text) == expected
    # an older tool's folder: only vocab.json + merges.txt
    (tmp_path / "vocab.json").write_text((out / "vocab.json").read_text())
    (tmp_path / "merges.txt").write_text((out / "merges.txt").read_text())
    old = load_tokenizer(tmp_path)
    assert old.encode(text) == expected and old.fingerprint == tok.fingerprint


def test_pretrained_gpt2_layout_eos_last(bpe, tmp_path):
    """OpenAI's GPT-2 folder keeps <|endoftext|> as the last id; eos_id follows it and tiktoken still applies."""
    tok, out = bpe
    vocab = json.loads((out / "vocab.json").read_text())
    shifted = {t: i - 1 for t, i in vocab.items() if t != EOS}
    shifted[EOS] = len(shifted)
    (tmp_path / "vocab.json").write_text(json.dumps(shifted))
    (tmp_path / "merges.txt").write_text((out / "merges.txt").read_text())
    gpt2 = load_tokenizer(tmp_path)
    assert gpt2.eos_id == gpt2.vocab_size - 1
    assert gpt2.fast_path == "tiktoken"
    texts = VARIED + random_texts(100, seed=2)
    assert gpt2.encode_batch(texts) == gpt2.reference_encode_batch(texts)
    assert [[i + 1 if i != gpt2.eos_id else 0 for i in ids] for ids in gpt2.encode_batch(texts)] == tok.encode_batch(
        texts
    )


def test_char_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    path = tmp_path / "poems.txt"
    path.write_text("床前明月光，疑是地上霜。\n举头望明月，低头思故乡。\n" * 3 + "孤\n", encoding="utf-8")
    tok = train_tokenizer([path], kind="char", vocab_size=100, out_dir=tmp_path / "tok")
    assert tok.kind == "char" and tok.eos_id == 0 and tok.unk_id == 1
    assert tok.fast_path == "char-table"
    # "孤" was seen once, below min_frequency=2; "雪" never: both are <|unk|>, one id per character
    ids = tok.encode("明月孤雪\n<|endoftext|>")
    assert ids[2:4] == [tok.unk_id, tok.unk_id] and ids[-1] == tok.eos_id and len(ids) == 6
    assert tok.decode(tok.encode("明月光\n")) == "明月光\n"
    assert tok.decode(ids) == f"明月{UNK}{UNK}\n{EOS}"
    texts = ["床前明月光 hello\n\n", "霜<|endoftext|>故乡", "", "🙂 unseen"]
    assert tok.encode_batch(texts) == tok.reference_encode_batch(texts)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    for text in texts:
        assert auto(text)["input_ids"] == tok.encode(text)
    assert load_tokenizer(tmp_path / "tok").fingerprint == tok.fingerprint


def test_char_vocab_size_keeps_most_frequent(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("aaaa bbb cc d\n" * 2, encoding="utf-8")
    tok = train_tokenizer([path], kind="char", vocab_size=5, min_frequency=1, out_dir=None)
    assert tok.vocab_size == 5  # eos, unk and the three most frequent characters: a, b, space
    assert tok.encode("ab ")[:3] != [tok.unk_id] * 3 and tok.encode("d") == [tok.unk_id]


def test_fingerprint_and_pickle(bpe, corpus):
    tok, out = bpe
    other = train_tokenizer([corpus], vocab_size=400, out_dir=None)
    assert other.fingerprint != tok.fingerprint
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.fingerprint == tok.fingerprint and clone.encode(VARIED[0]) == tok.encode(VARIED[0])


def test_token_byte_lengths(bpe):
    tok, _ = bpe
    lengths = tok.token_byte_lengths()
    for text in VARIED:
        clean = text.replace(EOS, "")
        assert int(lengths[tok.encode(text)].sum()) == len(clean.encode())


def test_bad_input(bpe, corpus, tmp_path):
    tok, out = bpe
    with pytest.raises(FileNotFoundError, match="no such"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no tokenizer here"):
        load_tokenizer(tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="bad.json"):
        load_tokenizer(tmp_path / "bad.json")
    with pytest.raises(TokenizerError, match="vocab_size=10"):
        train_tokenizer([corpus], vocab_size=10, out_dir=None)
    with pytest.raises(TokenizerError, match="kind='word'"):
        train_tokenizer([corpus], kind="word", out_dir=None)
    with pytest.raises(FileNotFoundError):
        train_tokenizer([tmp_path / "nope.txt"], out_dir=None)
    with pytest.raises(TokenizerError, match=r"vocab_size=300.*--vocab-size"):
        check_vocab_fits(tok, 300)
    check_vocab_fits(tok, tok.vocab_size)


def test_train_reads_inputs_like_prepare(tmp_path):
    """CSV columns, JSON Lines fields and cleaning reach the trainer: only the chosen text shapes the vocabulary."""
    rows = "\n".join(f'{i},"zqx{i % 3} zqx{i % 3} zqx{i % 3}",ignored words here' for i in range(50))
    (tmp_path / "t.csv").write_text("id,text,other\n" + rows + "\n")
    tok = train_tokenizer([tmp_path / "t.csv"], vocab_size=300, out_dir=None, column="text")
    vocab = tok.hf_tokenizer.get_vocab()
    assert "Ġzqx" in vocab and "ignored" not in vocab and "Ġwords" not in vocab
    (tmp_path / "t.jsonl").write_text(
        "\n".join(json.dumps({"body": "plover plover", "x": "unused"}) for _ in range(20))
    )
    tok = train_tokenizer([tmp_path / "t.jsonl"], vocab_size=300, out_dir=None, field="body")
    assert "Ġplover" in tok.hf_tokenizer.get_vocab() and "unused" not in tok.hf_tokenizer.get_vocab()
