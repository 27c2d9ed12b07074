"""Generation: greedy parity with transformers, each sampling filter against its transformers processor,
seeded reproducibility, left-padded batches, sliding past the context, stop strings and streaming."""

from __future__ import annotations

import pytest
import torch

from gptforge.generate import (
    NGramBan,
    SamplingOptions,
    apply_repetition_penalty,
    generate,
    generate_ids,
    pick,
    process_logits,
    top_k_filter,
    top_p_filter,
)

transformers = pytest.importorskip("transformers")
from transformers.generation import logits_process as lp  # noqa: E402

EOS = 0  # the hf_gpt2_dir model's eos / bos


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 300, (n,), generator=g).tolist() for n in lengths]


def _hf_new_tokens(hf, prompts, **kw):
    """transformers' generate on a left-padded batch; new tokens of each row, cut at eos."""
    T = max(map(len, prompts))
    ids = torch.tensor([[EOS] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(ids, attention_mask=mask, pad_token_id=EOS, eos_token_id=EOS, **kw)[:, T:].tolist()
    return [row[: row.index(EOS)] if EOS in row else row for row in out]


# --- greedy parity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 4, 9, 17])
def test_greedy_equals_transformers_single_prompt(models, length):
    ours_model, hf = models
    prompt = _prompts([length], seed=length)
    ref = _hf_new_tokens(hf, prompt, do_sample=False, max_new_tokens=40)
    assert generate_ids(ours_model, prompt, do_sample=False, max_new_tokens=40) == ref


def test_greedy_equals_transformers_left_padded_batch_with_processors(models):
    ours_model, hf = models
    prompts = _prompts([3, 11, 6, 1], seed=5)
    kw = dict(max_new_tokens=30, min_new_tokens=12, repetition_penalty=1.3, no_repeat_ngram_size=2)
    ref = _hf_new_tokens(hf, prompts, do_sample=False, **kw)
    ours = generate_ids(ours_model, prompts, do_sample=False, batch_size=4, **kw)
    assert ours == ref
    assert all(len(row) >= 12 for row in ours)  # eos suppressed for min_new_tokens
    # Batching must not change greedy results: one prompt at a time gives the same tokens.
    assert generate_ids(ours_model, prompts, do_sample=False, batch_size=1, **kw) == ours


def test_temperature_zero_is_greedy(models):
    m, _ = models
    p = _prompts([5])
    assert generate_ids(m, p, temperature=0, max_new_tokens=15) == generate_ids(
        m, p, do_sample=False, max_new_tokens=15
    )


def test_stops_at_eos_and_drops_it(models):
    m, _ = models
    p = _prompts([6], seed=3)
    free = generate_ids(m, p, do_sample=False, max_new_tokens=12, eos_id=None)[0]
    k = next(i for i, t in enumerate(free) if t not in free[:i] and i >= 2)  # first new token at index >= 2
    assert generate_ids(m, p, do_sample=False, max_new_tokens=12, eos_id=free[k])[0] == free[:k]
    # min_new_tokens forbids that token until then
    forced = generate_ids(m, p, do_sample=False, max_new_tokens=12, min_new_tokens=k + 1, eos_id=free[k])[0]
    assert len(forced) > k and forced[k] != free[k]


# --- filters against transformers' processors --------------------------------------------------------


def _kept(scores: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(scores)


@pytest.mark.parametrize("k", [1, 5, 50, 299])
def test_top_k_keeps_the_same_tokens_as_transformers(k):
    scores = torch.randn(16, 300) * 3
    ref = lp.TopKLogitsWarper(top_k=k)(None, scores.clone())
    assert torch.equal(_kept(top_k_filter(scores.clone(), k)), _kept(ref))
    assert _kept(top_k_filter(scores, k)).sum(-1).eq(k).all()


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9, 0.999])
def test_top_p_keeps_the_same_tokens_as_transformers(p):
    scores = torch.randn(64, 300) * 4
    ref = lp.TopPLogitsWarper(top_p=p)(None, scores.clone())
    ours = top_p_filter(scores.clone(), p)
    assert torch.equal(_kept(ours), _kept(ref))
    kept_mass = (scores.softmax(-1) * _kept(ours)).sum(-1)
    assert (kept_mass >= p - 1e-6).all()


def test_repetition_penalty_matches_transformers():
    scores = torch.randn(4, 300)
    ids = torch.randint(0, 300, (4, 20))
    seen = torch.zeros(4, 300, dtype=torch.bool).scatter_(1, ids, True)
    ref = lp.RepetitionPenaltyLogitsProcessor(1.7)(ids, scores.clone())
    torch.testing.assert_close(apply_repetition_penalty(scores, seen, 1.7), ref)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_bans_the_same_tokens_as_transformers(n):
    ids = torch.randint(0, 6, (5, 30))  # small alphabet: many repeats
    scores = torch.randn(5, 300)
    ref = lp.NoRepeatNGramLogitsProcessor(n)(ids, scores.clone())
    ours = process_logits(
        scores.clone(),
        SamplingOptions(do_sample=False, no_repeat_ngram_size=n),
        0,
        None,
        ngrams=[NGramBan(n, row) for row in ids.tolist()],
    )
    assert torch.equal(_kept(ours), _kept(ref))
    assert (~_kept(ours)).any()


def test_all_processors_in_transformers_order():
    ids = torch.randint(0, 300, (8, 12))
    scores = torch.randn(8, 300) * 2
    procs = lp.LogitsProcessorList(
        [
            lp.RepetitionPenaltyLogitsProcessor(1.2),
            lp.MinNewTokensLengthLogitsProcessor(12, 3, EOS),
            lp.TemperatureLogitsWarper(0.7),
            lp.TopKLogitsWarper(40),
            lp.TopPLogitsWarper(0.8),
        ]
    )
    ref = procs(ids, scores.clone())
    seen = torch.zeros(8, 300, dtype=torch.bool).scatter_(1, ids, True)
    opts = SamplingOptions(repetition_penalty=1.2, min_new_tokens=3, temperature=0.7, top_k=40, top_p=0.8)
    ours = process_logits(scores.clone(), opts, 0, EOS, seen)
    assert torch.equal(_kept(ours), _kept(ref))
    # the same distribution (below temperature 1 the best score is moved to 0 first: softmax does not change)
    torch.testing.assert_close(ours.log_softmax(-1)[_kept(ours)], ref.log_softmax(-1)[_kept(ref)])


def test_a_tiny_temperature_samples_the_best_token():
    scores = torch.tensor([[3.0, 9.0, -2.0, 8.5]])  # / 1e-39 overflows: the sampler used to see NaN and pick token 0
    opts = SamplingOptions(temperature=1e-39)
    for seed in range(40):  # every seed: at 1e-39 the best score used to overflow to +inf and tie with others
        g = torch.Generator().manual_seed(seed)
        assert pick(process_logits(scores.clone(), opts, 0, None, None), False, [g]).tolist() == [1]


def test_a_tiny_temperature_on_all_negative_logits_is_greedy_not_nan():
    scores = torch.tensor([[-7.0, -3.0, -9.0, -3.5]])  # GPT-2's logits are often all negative
    for t in (1e-39, 1e-30, 1e-8):
        processed = process_logits(scores.clone(), SamplingOptions(temperature=t), 0, None, None)
        assert not processed.softmax(-1).isnan().any()
        assert pick(processed, False, [torch.Generator().manual_seed(0)]).tolist() == [1]


def test_sampling_draws_from_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]]).expand(40000, 5)
    torch.manual_seed(0)
    freq = torch.bincount(pick(logits, False), minlength=5).float() / 40000
    torch.testing.assert_close(freq, logits[0].softmax(-1), atol=0.01, rtol=0)


# --- sampling behaviour ------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible(models):
    m, _ = models
    p = _prompts([4, 7])
    kw = dict(max_new_tokens=12, temperature=1.3, top_k=0, num_samples=3, batch_size=6)
    a = generate_ids(m, p, seed=11, **kw)
    assert a == generate_ids(m, p, seed=11, **kw)
    assert a != generate_ids(m, p, seed=12, **kw)
    assert len(a) == 6 and len({tuple(r) for r in a}) > 1


def test_a_seed_gives_the_same_samples_whether_or_not_each_step_is_watched(models):
    # a stop text or a stream watches every step, so a batch stops as soon as its rows end; unwatched, it looks
    # every 8 steps and drew more numbers first, which used to change every later batch's samples
    m, _ = models
    p = _prompts([4])
    kw = dict(max_new_tokens=20, temperature=1.5, top_k=0, num_samples=6, batch_size=1, seed=5)
    eos = generate_ids(m, p, eos_id=None, **kw)[0][2]  # the first sample ends by its third token
    assert generate_ids(m, p, eos_id=eos, **kw) == generate_ids(
        m, p, eos_id=eos, on_token=lambda i, row, piece: None, **kw
    )


def test_neighbouring_seeds_do_not_share_batches(models):
    m, _ = models
    kw = dict(max_new_tokens=8, temperature=1.5, top_k=0, num_samples=3, batch_size=1, eos_id=None)
    a, b = generate_ids(m, _prompts([4]), seed=0, **kw), generate_ids(m, _prompts([4]), seed=1, **kw)
    assert not set(map(tuple, a)) & set(map(tuple, b))  # seed 1's samples used to be seed 0's second and third


def test_top_k_one_sampling_is_greedy(models):
    m, _ = models
    p = _prompts([5])
    assert generate_ids(m, p, top_k=1, seed=3, max_new_tokens=20) == generate_ids(
        m, p, do_sample=False, max_new_tokens=20
    )


def test_sliding_past_the_context_matches_recomputing_each_window(models):
    """Past n_positions=64, the cache is rebuilt from the last context_keep tokens; compare every token
    with a model call on the same window without any cache."""
    m, _ = models
    prompt, keep, n_new = _prompts([20])[0], 40, 100
    ours = generate_ids(m, prompt, do_sample=False, max_new_tokens=n_new, eos_id=None, context_keep=keep)[0]
    assert len(ours) == n_new
    seq, start = list(prompt), 0
    for _ in range(n_new):
        if len(seq) - start > 64:
            start = len(seq) - keep
        logits, _ = m(torch.tensor([seq[start:]]))
        seq.append(int(logits[0, -1].argmax()))
    assert ours == seq[len(prompt) :]


def test_long_prompt_is_cut_from_the_left_with_a_warning(models):
    m, _ = models
    long = _prompts([90])[0]
    with pytest.warns(UserWarning, match="longer than the model's context"):
        out = generate_ids(m, long, do_sample=False, max_new_tokens=5, eos_id=None)
    assert out == generate_ids(m, long[-64:], do_sample=False, max_new_tokens=5, eos_id=None)


def test_empty_prompt_starts_from_eos(models):
    m, _ = models
    assert generate_ids(m, [], do_sample=False, max_new_tokens=8, eos_id=None) == generate_ids(
        m, [EOS], do_sample=False, max_new_tokens=8, eos_id=None
    )


def test_restores_training_mode(models):
    m, _ = models
    m.train()
    try:
        generate_ids(m, [1, 2], max_new_tokens=2)
        assert m.training
    finally:
        m.eval()


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(min_new_tokens=10, max_new_tokens=5), "min_new_tokens"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(num_samples=0), "num_samples"),
    ],
)
def test_bad_options_are_named(models, kw, match):
    with pytest.raises(ValueError, match=match):
        generate_ids(models[0], [1, 2, 3], **kw)


def test_bad_token_ids_are_rejected(models):
    with pytest.raises(ValueError, match="vocab_size"):
        generate_ids(models[0], [5, 300])


# --- text layer ----------------------------------------------------------------------------------------


def test_generate_text_is_the_decoded_ids(models, byte_tokenizer):
    tok = byte_tokenizer
    m, _ = models
    texts = generate(m, tok, ["ab", "hello"], do_sample=False, max_new_tokens=20)
    ids = generate_ids(m, [tok.encode("ab"), tok.encode("hello")], do_sample=False, max_new_tokens=20)
    assert texts == ["ab" + tok.decode(ids[0]), "hello" + tok.decode(ids[1])]
    assert generate(m, tok, "ab", do_sample=False, max_new_tokens=20, include_prompt=False) == [tok.decode(ids[0])]


def test_stop_strings_cut_the_text_and_streaming_agrees(models, byte_tokenizer):
    tok = byte_tokenizer
    m, _ = models
    # A model that emits ASCII: keep only tokens 'a'..'h' possible by biasing the embedding would change
    # the model, so instead pick the stop string from what the model actually writes.
    free = generate(m, tok, "x", seed=4, max_new_tokens=40, top_k=0, include_prompt=False)[0]
    stop = free[10:12]
    assert stop
    pieces: list[str] = []
    out = generate(
        m,
        tok,
        "x",
        seed=4,
        max_new_tokens=40,
        top_k=0,
        stop=[stop, "\x00never"],
        stream=lambda row, piece: pieces.append(piece),
    )[0]
    assert out == "x" + free[: free.index(stop)]
    assert "".join(pieces) == out


def test_streaming_several_samples_rebuilds_each(models, byte_tokenizer):
    tok = byte_tokenizer
    m, _ = models
    parts: dict[int, str] = {}
    out = generate(
        m,
        tok,
        "ok",
        seed=1,
        num_samples=3,
        max_new_tokens=15,
        stream=lambda row, piece: parts.__setitem__(row, parts.get(row, "") + piece),
    )
    assert [parts[i] for i in range(3)] == out
    assert out == generate(m, tok, "ok", seed=1, num_samples=3, max_new_tokens=15)


# --- command line ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, sample_text):
    """A tiny random model folder with a byte-level BPE tokenizer.json trained here (vocab 300, eos id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from gptforge import GPT, GPTConfig, save_model

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(
        [sample_text],
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    )
    folder = tmp_path_factory.mktemp("gen_model")
    save_model(model, folder)
    hf.save(str(folder / "tokenizer.json"))
    return folder


def _cli(argv, capsys, stdin: str | None = None, monkeypatch=None):
    import io

    from gptforge.cli import main

    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_greedy_equals_the_api(model_dir, capsys):
    from gptforge.checkpoint import load_model_and_tokenizer

    m, tok = load_model_and_tokenizer(model_dir, device="cpu")
    ref = generate(m, tok, "the quick", do_sample=False, max_new_tokens=15)[0]
    rc, out, _ = _cli(["generate", str(model_dir), "the quick", "--greedy", "--max-new-tokens", "15"], capsys)
    assert rc == 0 and out == ref + "\n"


def test_cli_beam_search_equals_the_api_and_is_refused_with_sampling(model_dir, capsys):
    from gptforge.checkpoint import load_model_and_tokenizer

    m, tok = load_model_and_tokenizer(model_dir, device="cpu")
    kw = dict(num_beams=3, num_samples=2, length_penalty=0.5, early_stopping="never", max_new_tokens=10)
    ref = generate(m, tok, "the quick", do_sample=False, **kw)
    argv = [
        "generate",
        str(model_dir),
        "the quick",
        "--greedy",
        "--num-beams",
        "3",
        "--num-samples",
        "2",
        "--length-penalty",
        "0.5",
        "--early-stopping",
        "never",
        "--max-new-tokens",
        "10",
        "--delimiter",
        "|",
    ]
    rc, out, _ = _cli(argv, capsys)
    assert rc == 0 and out == "|".join(ref) + "\n"
    rc, out, err = _cli(["generate", str(model_dir), "x", "--num-beams", "3"], capsys)
    assert rc == 2 and "num_beams=3" in err and "--greedy" in err and len(err.strip().splitlines()) == 1


def test_cli_seeded_samples_repeat_and_go_to_a_dated_file(model_dir, tmp_path, capsys):
    argv = [
        "generate",
        str(model_dir),
        "a",
        "b",
        "--num-samples",
        "2",
        "--seed",
        "7",
        "--max-new-tokens",
        "12",
        "--delimiter",
        "\n---\n",
    ]
    rc, first, _ = _cli(argv, capsys)
    assert rc == 0 and first.count("\n---\n") == 3
    assert _cli(argv, capsys)[1] == first
    rc, out, err = _cli(argv + ["--out-dir", str(tmp_path / "samples")], capsys)
    files = list((tmp_path / "samples").iterdir())
    assert rc == 0 and out == "" and len(files) == 1 and "seed7" in files[0].name and str(files[0]) in err
    assert files[0].read_text(encoding="utf-8") == first
    _cli(argv + ["--out-dir", str(tmp_path / "samples")], capsys)
    assert len(list((tmp_path / "samples").iterdir())) == 2  # a second run never overwrites the first


def test_cli_prompts_from_files_stdin_and_interactive(model_dir, tmp_path, capsys, monkeypatch):
    (tmp_path / "p.txt").write_text("one\ntwo\n", encoding="utf-8")
    base = ["generate", str(model_dir), "--greedy", "--max-new-tokens", "5", "--no-stream", "--delimiter", "|"]
    _, from_file, _ = _cli(base + ["--prompt-file", str(tmp_path / "p.txt"), "--lines"], capsys)
    _, from_args, _ = _cli(base + ["-p", "one", "--prompt", "two"], capsys)
    assert _cli(["generate", str(model_dir), "one", "two"] + base[2:], capsys)[1] == from_args
    _, from_stdin, _ = _cli(base + ["--lines", "-p", "-"], capsys, stdin="one\ntwo\n", monkeypatch=monkeypatch)
    assert from_file == from_args == from_stdin and from_args.startswith("one") and "|two" in from_args
    _, inter, _ = _cli(base[:-3] + ["--interactive"], capsys, stdin="one\ntwo\n", monkeypatch=monkeypatch)
    assert inter.replace("\n", "") == from_args.replace("|", "").replace("\n", "")


@pytest.mark.parametrize(
    "option, value", [("--top-p", "0"), ("--temperature", "-1"), ("--top-k", "-2"), ("--min-new-tokens", "500")]
)
def test_cli_bad_options_are_one_line_errors(model_dir, capsys, option, value):
    rc, out, err = _cli(["generate", str(model_dir), "x", option, value], capsys)
    assert rc == 2 and out == ""
    assert option.lstrip("-").replace("-", "_") in err and len(err.strip().splitlines()) == 1


def test_cli_model_without_tokenizer_says_how_to_attach_one(model_dir, tmp_path, capsys):
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model_dir / name, bare / name)
    rc, _, err = _cli(["generate", str(bare), "x"], capsys)
    assert rc == 2 and "no tokenizer" in err and "--tokenizer" in err
    rc, out, _ = _cli(
        ["generate", str(bare), "x", "--tokenizer", str(model_dir), "--greedy", "--max-new-tokens", "3"], capsys
    )
    assert rc == 0 and out.startswith("x")


def test_cli_streams_samples_one_after_another(model_dir, capsys):
    argv = ["generate", str(model_dir), "ab", "cd", "--seed", "3", "--max-new-tokens", "8", "--delimiter", "\n#\n"]
    rc, streamed, _ = _cli(argv + ["--batch-size", "1"], capsys)
    rc2, printed, _ = _cli(argv + ["--batch-size", "1", "--no-stream"], capsys)
    assert rc == rc2 == 0 and streamed == printed
    samples = printed.rstrip("\n").split("\n#\n")
    assert len(samples) == 2 and samples[0].startswith("ab") and samples[1].startswith("cd")


def test_unseen_characters_follow_the_tokenizer_policy(models, sample_text):
    """A char vocabulary encodes an unseen character as <|unk|> (its documented policy); generation goes on."""
    from gptforge.data.vocabulary import train_tokenizer

    tok = train_tokenizer([], kind="char", vocab_size=100, texts=[sample_text], out_dir=None)
    m, _ = models
    prompt = "the fox ☃"  # the snowman is not in sample_text
    assert tok.encode(prompt)[-1] == tok.unk_id
    out = generate(m, tok, prompt, do_sample=False, max_new_tokens=10, include_prompt=False)[0]
    ids = generate_ids(m, tok.encode(prompt), do_sample=False, max_new_tokens=10, eos_id=tok.eos_id)[0]
    assert out == tok.decode(ids)


# --- incremental detokenising ----------------------------------------------------------------------------


class _CountingTokenizer:
    """A byte tokenizer that counts how many token ids it has decoded."""

    def __init__(self, inner):
        self.inner, self.eos_id, self.decoded = inner, inner.eos_id, 0

    def encode(self, text):
        return self.inner.encode(text)

    def decode(self, ids):
        self.decoded += len(ids)
        return self.inner.decode(ids)


def test_text_streams_decode_each_token_a_bounded_number_of_times(byte_tokenizer):
    from gptforge.generate import TextStream

    tok = _CountingTokenizer(byte_tokenizer)
    text = "héllo wörld, 日本語の文 and emoji 🙂 " * 60  # characters of 1 to 4 bytes, split across byte tokens
    ids = tok.encode(text)
    stream, pieces = TextStream(tok, stop=["never seen"]), []
    for n in range(1, len(ids) + 1):
        pieces.append(stream.push(ids[:n], final=n == len(ids)))
        assert "\ufffd" not in pieces[-1]  # half a character is never released
    assert "".join(pieces) == text == stream.text
    assert tok.decoded < 6 * len(ids)  # linear; decoding the whole row each time was len(ids)**2 / 2


def test_generate_decodes_linearly_and_stops_inside_multibyte_text(models, byte_tokenizer):
    m, _ = models
    tok = _CountingTokenizer(byte_tokenizer)
    out = generate(m, tok, "x", seed=2, max_new_tokens=300, top_k=0, temperature=1.5, include_prompt=False)[0]
    # random bytes: about half end on part of a character and keep the window open a step or two longer
    assert tok.decoded < 12 * 300  # decoding the whole row at every token was 300**2 / 2 = 45,000
    ids = generate_ids(m, tok.encode("x"), seed=2, max_new_tokens=300, top_k=0, temperature=1.5, eos_id=0)[0]
    assert out == byte_tokenizer.decode(ids)
