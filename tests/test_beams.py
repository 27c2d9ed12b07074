"""Beam search: token-for-token parity with transformers' generate(num_beams=...) on the same weights, for single
prompts and left-padded batches, with length_penalty, early_stopping and no_repeat_ngram_size; the options it
refuses; batching and sliding past the context."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from gptforge.errors import OptionError
from gptforge.generate import generate, generate_ids

transformers = pytest.importorskip("transformers")

# Padding is not text: gptforge's n-gram bans and repetition penalty ignore it (a prompt's results do not depend
# on its neighbours in a batch), while transformers' see the pad tokens of a left-padded row. The batches here are
# padded with a token that neither the prompts nor the generated texts contain, where both agree.
PAD = 299


def _prompts(lengths, seed=0, avoid=()):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        p = torch.randint(1, 300, (n,), generator=g).tolist()
        out.append([t if t not in avoid else t % 299 + 1 for t in p])
    return out


def _frequent_token(model) -> int:
    """The token the random model's greedy text repeats most: as end of text, it ends many hypotheses."""
    counts = Counter(
        t for row in generate_ids(model, _prompts([3, 7], seed=11), do_sample=False, max_new_tokens=30) for t in row
    )
    return counts.most_common(1)[0][0]


def _hf_beams(hf, prompts, eos, n=1, **kw):
    """transformers' beam search on a left-padded batch: the n best sequences of each prompt, cut at eos."""
    T = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(
        ids, attention_mask=mask, pad_token_id=PAD, eos_token_id=eos, do_sample=False, num_return_sequences=n, **kw
    )[:, T:].tolist()
    return [row[: row.index(eos)] if eos in row else row for row in out]


SETTINGS = [
    {},
    {"length_penalty": 0.0},
    {"length_penalty": 2.0, "early_stopping": True},
    {"length_penalty": -1.0, "early_stopping": True},
    {"length_penalty": 1.5, "early_stopping": "never"},
    {"early_stopping": "never"},
    {"no_repeat_ngram_size": 2},
    {"no_repeat_ngram_size": 3, "length_penalty": 0.5, "early_stopping": True},
    {"repetition_penalty": 1.3, "min_new_tokens": 6},
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "default")
@pytest.mark.parametrize("lengths", [[4], [3, 9, 1, 5]], ids=["one prompt", "left-padded batch"])
def test_beam_search_equals_transformers(models, settings, lengths, one_thread):
    ours, hf = models
    eos = _frequent_token(ours)
    prompts = _prompts(lengths, seed=len(lengths), avoid=(eos, PAD))
    ref = _hf_beams(hf, prompts, eos, num_beams=4, max_new_tokens=24, **settings)
    got = generate_ids(ours, prompts, eos_id=eos, num_beams=4, do_sample=False, max_new_tokens=24, **settings)
    assert got == ref
    assert all(PAD not in row for row in got)


def test_the_parity_test_reaches_end_of_text(models):
    """Hypotheses that end at end of text are where length_penalty and early_stopping act: the parity test's
    end of text must end some of them before max_new_tokens."""
    ours, _ = models
    eos = _frequent_token(ours)
    prompts = _prompts([3, 9, 1, 5], seed=4, avoid=(eos, PAD))
    rows = generate_ids(
        ours, prompts, eos_id=eos, num_beams=4, num_samples=4, do_sample=False, max_new_tokens=24, length_penalty=0.0
    )
    assert any(len(r) < 24 for r in rows)


def test_num_samples_are_the_best_hypotheses_best_first(models, one_thread):
    ours, hf = models
    eos = _frequent_token(ours)
    prompts = _prompts([2, 6], seed=8, avoid=(eos, PAD))
    ref = _hf_beams(hf, prompts, eos, n=3, num_beams=5, max_new_tokens=20, length_penalty=0.0)
    got = generate_ids(
        ours, prompts, eos_id=eos, num_beams=5, num_samples=3, do_sample=False, max_new_tokens=20, length_penalty=0.0
    )
    assert got == ref and len(got) == 6


def test_batching_does_not_change_beams_even_past_the_context(models, one_thread):
    """Prompts searched together (rows of one batch, the cache reordered per step) give what each gives alone,
    also when the beams slide past the 64-token context."""
    ours, _ = models
    prompts = _prompts([30, 5, 17], seed=2)
    kw = dict(num_beams=3, do_sample=False, max_new_tokens=50, eos_id=None, context_keep=40)
    together = generate_ids(ours, prompts, batch_size=9, **kw)
    alone = generate_ids(ours, prompts, batch_size=3, **kw)
    assert together == alone and [len(r) for r in together] == [50, 50, 50]


def test_beam_text_is_the_decoded_ids(models, byte_tokenizer):
    m, _ = models
    kw = dict(num_beams=2, num_samples=2, do_sample=False, max_new_tokens=12)
    texts = generate(m, byte_tokenizer, ["ab", "xyz"], **kw)
    ids = generate_ids(m, [byte_tokenizer.encode("ab"), byte_tokenizer.encode("xyz")], eos_id=0, **kw)
    assert texts == [p + byte_tokenizer.decode(r) for p, r in zip(["ab", "ab", "xyz", "xyz"], ids)]


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(num_beams=4), ("num_beams=4", "do_sample=False")),  # sampling is the default
        (dict(num_beams=2, num_samples=3, do_sample=False), ("num_samples=3", "num_beams=2")),
        (dict(num_beams=0), ("num_beams=0",)),
        (dict(num_beams=2, do_sample=False, early_stopping="sometimes"), ("early_stopping", "never")),
        (dict(num_beams=2, do_sample=False, length_penalty=float("nan")), ("length_penalty",)),
    ],
)
def test_options_beam_search_cannot_honour_are_refused_by_name(models, kw, words):
    with pytest.raises(OptionError) as e:
        generate_ids(models[0], [1, 2, 3], **kw)
    assert all(w in str(e.value) for w in words) and "\n" not in str(e.value)


def test_stop_strings_and_streaming_are_refused_with_beams(models, byte_tokenizer):
    m, _ = models
    kw = dict(num_beams=2, do_sample=False, max_new_tokens=5)
    with pytest.raises(OptionError, match="num_beams=2.*stop strings"):
        generate(m, byte_tokenizer, "ab", stop=["\n"], **kw)
    with pytest.raises(OptionError, match="num_beams=2.*streaming"):
        generate(m, byte_tokenizer, "ab", stream=lambda i, piece: None, **kw)


def test_early_stopping_from_the_command_line_is_parsed():
    from gptforge.options import SamplingOptions

    assert SamplingOptions(early_stopping="never").early_stopping == "never"
    assert SamplingOptions(early_stopping="True").early_stopping is True
    assert SamplingOptions(early_stopping="false").early_stopping is False


def test_gptforge_generate_takes_num_beams(models, byte_tokenizer):
    from gptforge import GPTForge

    m, _ = models
    ai = GPTForge(m, tokenizer=byte_tokenizer, device="cpu")
    texts = ai.generate(n=2, prompt="ab", max_new_tokens=10, num_beams=3, do_sample=False, return_as_list=True)
    assert texts == generate(m, byte_tokenizer, "ab", num_beams=3, num_samples=2, do_sample=False, max_new_tokens=10)
    assert len(set(texts)) == 2  # two hypotheses, not one sample twice
