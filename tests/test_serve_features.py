"""The server's newer features, in-process and fast: logit_bias, the prefix cache, several adapters on one base,
and the Prometheus metrics (a real server for the scrape and for adapters over HTTP, marked slow)."""

from __future__ import annotations

import pytest
import torch

from gptforge.config import GPTConfig
from gptforge.data.vocabulary import train_tokenizer
from gptforge.errors import OptionError
from gptforge.generate import SamplingOptions, generate_ids
from gptforge.model import GPT


@pytest.fixture(scope="module")
def tiny(sample_text):
    """(model, tokenizer): a random 2-layer GPT with a 300-token BPE trained on the sample text."""
    tok = train_tokenizer([], vocab_size=300, texts=[sample_text], out_dir=None)
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=tok.vocab_size,
        n_positions=256,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=tok.eos_id,
        eos_token_id=tok.eos_id,
    )
    return GPT(config).eval(), tok


# --- logit_bias -------------------------------------------------------------------------------------------


def test_logit_bias_moves_the_choice_in_generate(tiny):
    model, tok = tiny
    prompt = tok.encode("the quick brown fox")
    plain = generate_ids(model, prompt, max_new_tokens=6, do_sample=False, eos_id=None)[0]
    banned = generate_ids(model, prompt, max_new_tokens=6, do_sample=False, eos_id=None, logit_bias={plain[0]: -100})
    assert banned[0][0] != plain[0]
    forced = generate_ids(model, prompt, max_new_tokens=6, eos_id=None, seed=1, logit_bias={7: 100})[0]
    assert forced == [7] * 6  # sampled, yet a +100 bias leaves nothing else


def test_logit_bias_from_the_command_line_and_its_errors(tiny):
    assert SamplingOptions(logit_bias="5:-100, 7:2.5").logit_bias == {5: -100.0, 7: 2.5}
    assert SamplingOptions(logit_bias='{"5": 1}').logit_bias == {5: 1.0}
    assert SamplingOptions(logit_bias={"5": 1}).logit_bias == {5: 1}  # a JSON config file's keys
    with pytest.raises(OptionError, match="logit_bias='5=1'"):
        SamplingOptions(logit_bias="5=1")
    with pytest.raises(OptionError, match="from -100 to 100") as e:
        SamplingOptions.make(logit_bias={5: 101})
    assert e.value.param == "logit_bias"
    with pytest.raises(OptionError, match="token id 999 is not in the vocabulary"):
        generate_ids(tiny[0], [1, 2], max_new_tokens=2, logit_bias={999: 1})


def test_logit_bias_over_the_api_is_a_400_naming_the_field(tiny):
    pytest.importorskip("starlette")
    from gptforge.options import ServeOptions
    from gptforge.serve import ApiError, Server

    server = Server(*tiny, ServeOptions())
    job = server.completion_job({"prompt": "hi", "logit_bias": {"7": -100, "9": 3}})
    assert job.opts.logit_bias == {7: -100.0, 9: 3.0}
    for bad in ({"x": 1}, {"999": 1}, {"7": 101}, {"7": True}, [1]):
        with pytest.raises(ApiError) as e:
            server.completion_job({"prompt": "hi", "logit_bias": bad})
        assert e.value.status == 400 and e.value.param == "logit_bias"


# --- the prefix cache -------------------------------------------------------------------------------------


def run_engine(engine, batches: list[list[tuple[list[int], dict]]], adapters: list[int] = ()) -> list:
    """Submit each batch of (prompt, options) together, waiting for it to end before the next; the sequences (the
    first batch's under `adapters`, where given)."""
    import threading

    from gptforge.serve.engine import Sequence

    out = []
    for batch in batches:
        done = threading.Semaphore(0)
        seqs = []
        for i, (prompt, opts) in enumerate(batch):
            adapter = adapters[i] if adapters and not out else 0
            s = Sequence(prompt, SamplingOptions(**opts), None, logprobs=0, adapter=adapter)
            s.events = []
            s.emit = lambda ev, s=s: (s.events.append(ev), ev.finish and done.release())
            seqs.append(s)
        assert engine.submit(seqs)
        for _ in seqs:
            assert done.acquire(timeout=60)
        out += seqs
    return out


def test_the_prefix_cache_gives_the_same_tokens_and_counts_what_it_reused(tiny, one_thread):
    from gptforge.serve.engine import Engine

    model, tok = tiny
    g = torch.Generator().manual_seed(3)
    shared = torch.randint(1, tok.vocab_size, (70,), generator=g).tolist()
    tails = [torch.randint(1, tok.vocab_size, (n,), generator=g).tolist() for n in (3, 9, 1, 30, 5)]
    greedy = dict(max_new_tokens=12, do_sample=False)
    batches = [
        [(shared + tails[0], greedy)],  # fills the cache
        [(shared + tails[1], greedy), (shared + tails[2], dict(max_new_tokens=8, seed=5))],  # both reuse 64 tokens
        [(shared[:20] + tails[3], greedy), (tails[4], greedy), (shared + tails[0], greedy)],  # partial, none, all
    ]
    results = []
    for size in (0, 1 << 24):
        engine = Engine(model, tok, max_batch=8, prefix_cache_bytes=size).start()
        try:
            results.append(run_engine(engine, batches))
        finally:
            engine.stop()
    plain, cached = results
    for a, b in zip(plain, cached):
        assert a.row.ids == b.row.ids
        assert b.row.token_logprobs == pytest.approx(a.row.token_logprobs, abs=1e-4)
    assert [s.cached for s in plain] == [0] * 6
    assert [s.cached for s in cached] == [0, 64, 64, 16, 0, 64]  # whole 16-token blocks, never the last token
    stats = engine.stats()["prefix_cache"]
    assert stats["hits"] == 208 and stats["queries"] == sum(len(s.prompt) for s in cached)


def test_the_prefix_cache_stays_in_its_bound_and_evicts_the_least_recently_used():
    from gptforge.serve.prefix import PrefixCache

    layers, heads, cols, dim = 2, 2, 64, 4
    k = [torch.randn(1, heads, cols, dim) for _ in range(layers)]
    v = [torch.randn(1, heads, cols, dim) for _ in range(layers)]
    block_bytes = 2 * layers * heads * 16 * dim * 4
    cache = PrefixCache(5 * block_bytes)
    a, b = list(range(1, 50)), list(range(100, 149))  # 3 whole blocks each
    cache.store(a, 0, k, v, 0, 0)
    assert cache.lookup(a + [7], 0)[1] == 48 and cache.lookup(a, 1)[1] == 0  # another adapter: another prefix
    cache.store(b, 0, k, v, 0, 0)  # 6 blocks > 5: a's last block (least recently used, the deepest) goes
    assert cache.bytes == 5 * block_bytes and len(cache.blocks) == 5
    assert cache.lookup(b + [7], 0)[1] == 48 and cache.lookup(a + [7], 0)[1] == 32
    found, n = cache.lookup(a + [7], 0)
    out = [torch.zeros(1, heads, cols, dim) for _ in range(layers)]
    cache.copy_into(found, n, out, [torch.zeros_like(t) for t in out], 0, 0)
    assert torch.equal(out[1][:, :, :32], k[1][:, :, :32]) and not out[1][:, :, 32:].any()
    cache.store(list(range(200, 217)), 0, k, v, 0, 0)  # b was used before a: b's deepest block goes
    assert cache.lookup(b + [7], 0)[1] == 32 and cache.lookup(a + [7], 0)[1] == 32


# --- several adapters on one base ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapted(tiny, tmp_path_factory):
    """A base folder and two adapter folders trained on it (random updates, strong enough to change the text)."""
    import copy

    from gptforge.adapters import apply_lora, save_adapter
    from gptforge.checkpoint import save_model

    model, tok = tiny
    root = tmp_path_factory.mktemp("adapters")
    base = save_model(model, root / "base", tok)
    folders = {}
    for name, targets, seed in (("poet", "c_attn,c_proj", 1), ("chef", "c_fc", 2)):
        m = copy.deepcopy(model)
        apply_lora(m, 4, 8.0, targets=targets, base=base)
        torch.manual_seed(seed)
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, 0.5)
        folders[name] = save_adapter(m, root / name, base=base)
    return base, folders


def test_adapters_and_the_base_in_one_batch_give_the_merged_models_tokens(adapted, one_thread):
    from gptforge.checkpoint import load_model_and_tokenizer
    from gptforge.serve.adapters import AdapterSet
    from gptforge.serve.engine import Engine

    base, folders = adapted
    model, tok = load_model_and_tokenizer(base)
    adapters = AdapterSet(model, folders)
    prompts = [tok.encode("the quick brown fox"), tok.encode("a lazy dog sat")]
    jobs = [(p, j) for p in prompts for j in (0, 1, 2)]
    engine = Engine(model, tok, max_batch=8, adapters=adapters).start()
    try:
        seqs = run_engine(
            engine, [[(p, dict(max_new_tokens=10, do_sample=False)) for p, _ in jobs]], [j for _, j in jobs]
        )
    finally:
        engine.stop()
    assert engine.peak_batch == 6  # all in one batch
    names = [None, "poet", "chef"]
    for s, (p, j) in zip(seqs, jobs):
        merged = (
            load_model_and_tokenizer(base, adapter=folders[names[j]])[0] if j else load_model_and_tokenizer(base)[0]
        )
        ref = generate_ids(merged, p, max_new_tokens=10, do_sample=False, eos_id=tok.eos_id)[0]
        assert s.row.ids == ref, f"{names[j]} on {tok.decode(p)!r}"
    assert len({tuple(s.row.ids) for s in seqs[:3]}) == 3  # each adapter changes the text


def test_adapter_flags():
    from gptforge.serve.adapters import parse_adapter_flags

    assert parse_adapter_flags(None) == (None, {})
    assert parse_adapter_flags(["runs/lora", "poet=runs/a", "chef=b"]) == ("runs/lora", {"poet": "runs/a", "chef": "b"})
    with pytest.raises(OptionError, match="given twice"):
        parse_adapter_flags(["a=x", "a=y"])
    with pytest.raises(OptionError, match="one adapter can be merged"):
        parse_adapter_flags(["x", "y"])


# --- over HTTP: adapters by name, cached tokens, the metrics ------------------------------------------------


@pytest.fixture(scope="module")
def http(adapted):
    """A server of the base and both adapters, in-process (Starlette's test client; the engine thread runs)."""
    pytest.importorskip("starlette")
    pytest.importorskip("prometheus_client")
    from starlette.testclient import TestClient

    from gptforge.checkpoint import load_model_and_tokenizer
    from gptforge.options import ServeOptions
    from gptforge.serve import Server, create_app

    base, folders = adapted
    server = Server(*load_model_and_tokenizer(base), ServeOptions(), model_name="base", adapters=folders)
    with TestClient(create_app(server), base_url="http://localhost") as client:
        yield client


def test_models_lists_the_base_and_its_adapters_and_a_request_picks_one(http, adapted):
    from gptforge.checkpoint import load_model_and_tokenizer
    from gptforge.generate import generate

    base, folders = adapted
    cards = http.get("/v1/models").json()["data"]
    assert [c["id"] for c in cards] == ["base", "poet", "chef"] and cards[1]["parent"] == "base"
    body = {"prompt": "the quick brown fox", "max_tokens": 8, "temperature": 0}
    for name in ("poet", "base"):
        r = http.post("/v1/completions", json={**body, "model": name}).json()
        merged = load_model_and_tokenizer(base, adapter=folders[name] if name != "base" else None)
        want = generate(*merged, body["prompt"], max_new_tokens=8, do_sample=False, include_prompt=False)[0]
        assert r["model"] == name and r["choices"][0]["text"] == want
    r = http.post("/v1/completions", json={**body, "model": "nobody"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def test_cached_tokens_in_usage_and_the_metrics_scrape(http, tiny):
    prompt = list(range(1, 60))
    first = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 3, "model": "chef"}).json()
    again = http.post("/v1/completions", json={"prompt": prompt + [5], "max_tokens": 3, "model": "chef"}).json()
    other = http.post("/v1/completions", json={"prompt": prompt + [5], "max_tokens": 3, "model": "poet"}).json()
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 48
    assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # another adapter's keys and values
    page = http.get("/metrics")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain")
    values = {}
    for line in page.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    label = '{model_name="base"}'
    assert values[f"gptforge:prefix_cache_hits_total{label}"] >= 48
    assert values[f"gptforge:prefix_cache_queries_total{label}"] >= 59 + 60 + 60
    assert values[f"gptforge:generation_tokens_total{label}"] >= 9
    assert values[f"gptforge:time_to_first_token_seconds_count{label}"] >= 3
    assert values[f"gptforge:inter_token_latency_seconds_count{label}"] >= 6
    assert values[f"gptforge:e2e_request_latency_seconds_count{label}"] >= 3
    assert values[f"gptforge:request_queue_time_seconds_count{label}"] >= 3
    assert values[f"gptforge:num_requests_running{label}"] == 0
    assert values[f"gptforge:num_requests_waiting{label}"] == 0
    assert 'gptforge:request_success_total{finished_reason="length",model_name="base"}' in values


def test_a_requests_grammar_is_compiled_once_for_all_its_rows(http, monkeypatch):
    pytest.importorskip("llguidance")
    import gptforge.generate as core

    compiled = []
    real = core.make_constraint
    monkeypatch.setattr(core, "make_constraint", lambda *a, **k: compiled.append(1) or real(*a, **k))
    body = {"prompt": "pick:", "max_tokens": 8, "n": 3, "guided_choice": ["red", "green"], "seed": 1}
    r = http.post("/v1/completions", json=body).json()
    assert {c["text"] for c in r["choices"]} <= {"red", "green"}
    assert len(compiled) == 1  # checked once; the rows take copies (it was compiled again for every row)


@pytest.mark.slow
def test_gptforge_serve_with_named_adapters(adapted):
    pytest.importorskip("uvicorn")
    from conftest import RunningServer

    base, folders = adapted
    s = RunningServer(base, "--adapter", f"poet={folders['poet']}", "--adapter", f"chef={folders['chef']}")
    try:
        status, models = s.get("/v1/models")
        assert status == 200 and [m["id"] for m in models["data"]] == ["base", "poet", "chef"]
        body = {"prompt": "the quick", "max_tokens": 6, "temperature": 0}
        texts = {
            name: s.post("/v1/completions", {**body, "model": name})[2]["choices"][0]["text"]
            for name in ("base", "poet")
        }
        assert texts["base"] != texts["poet"]
        status, _, page = s.raw("GET", "/metrics")
        assert status == 200 and b"gptforge:generation_tokens_total" in page
    finally:
        s.stop()
