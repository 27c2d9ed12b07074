"""The cost of structured output: tokens per second with and without a JSON-schema constraint, and the grammar
engines' own time per token on the same byte-level BPE.

Generation: a random `small` model (and `gpt2` with --models), a 5,000-token BPE trained on the English fortunes,
batch 1 and 8, sampling 128 tokens after an empty prompt, the same seeds with and without a schema (a JSON object of
a name, an integer and a list of tags), alternating trials, medians. The mask engines: how long llguidance,
xgrammar and outlines-core take to give the allowed tokens of one step, averaged over the steps of texts the
schema accepts (the text a model under the schema writes), on the same tokenizer.

    python benchmarks/bench_constraints.py [--models small,gpt2] [--trials 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from machine import cpu_name

from gptforge import GPT, preset
from gptforge.data.vocabulary import train_tokenizer
from gptforge.generate import generate

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "fortunes_en.txt"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 4},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


def tokens_per_second(model, tok, batch: int, schema: str | None, trials: int) -> float:
    def run() -> float:
        t = time.perf_counter()
        texts = generate(
            model,
            tok,
            [""] * batch,
            max_new_tokens=128,
            seed=0,
            top_k=0,
            json_schema=schema,
            include_prompt=False,
            batch_size=batch,
        )
        n = sum(len(tok.encode(x)) + 1 for x in texts)  # + the end of text
        return n / (time.perf_counter() - t)

    run()  # warm-up
    return statistics.median(run() for _ in range(trials))


def mask_engines(tok, texts: list[str]) -> dict[str, float]:
    """Microseconds per step to compute the allowed tokens, for each engine that is installed."""
    out = {}
    steps = [tok.encode(t) for t in texts]
    vocab = tok.vocab_size
    try:
        import llguidance

        lt = llguidance.LLTokenizer(tok.hf_tokenizer.to_str(), n_vocab=vocab, eos_token=tok.eos_id)
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
        t, n = time.perf_counter(), 0
        for ids in steps:
            m = llguidance.LLMatcher(lt, grammar)
            for i in ids:
                m.compute_bitmask()
                m.consume_token(i)
                n += 1
        out["llguidance"] = (time.perf_counter() - t) / n * 1e6
    except ImportError:
        pass
    try:
        import xgrammar as xg

        vocab_list = [tok.hf_tokenizer.id_to_token(i) for i in range(vocab)]
        info = xg.TokenizerInfo(vocab_list, xg.VocabType.BYTE_LEVEL, stop_token_ids=[tok.eos_id])
        compiled = xg.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA))
        mask = xg.allocate_token_bitmask(1, vocab)
        t, n = time.perf_counter(), 0
        for ids in steps:
            m = xg.GrammarMatcher(compiled)
            for i in ids:
                m.fill_next_token_bitmask(mask)
                if not m.accept_token(i):
                    break
                n += 1
        out["xgrammar"] = (time.perf_counter() - t) / max(n, 1) * 1e6
    except ImportError:
        pass
    try:
        import outlines_core as oc

        from gptforge.fastencode import byte_to_unicode

        raw = {c: b for b, c in byte_to_unicode().items()}  # byte-level token text -> its bytes
        vocabulary: dict = {}
        for token, i in tok.hf_tokenizer.get_vocab().items():
            if i != tok.eos_id:
                key = bytes(raw[c] for c in token) if all(c in raw for c in token) else token.encode()
                vocabulary.setdefault(key, []).append(i)
        t0 = time.perf_counter()
        index = oc.Index(
            oc.json_schema.build_regex_from_schema(json.dumps(SCHEMA)), oc.Vocabulary(tok.eos_id, vocabulary)
        )
        out["outlines-core index build, s"] = time.perf_counter() - t0
        t, n = time.perf_counter(), 0
        for ids in steps:
            g = oc.Guide(index)
            for i in ids:
                g.get_tokens()
                g.advance(i)
                n += 1
        out["outlines-core"] = (time.perf_counter() - t) / n * 1e6
    except (ImportError, ValueError) as e:
        print(f"outlines-core: not measured ({e})")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="small")
    ap.add_argument("--trials", type=int, default=3)
    args = ap.parse_args()
    print(f"# {cpu_name()}, {platform.machine()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    tok = train_tokenizer([], vocab_size=5000, texts=[CORPUS.read_text(encoding="utf-8")], out_dir=None)
    print("| model | batch | plain tokens/s | under the schema tokens/s | throughput lost |")
    print("| --- | --- | --- | --- | --- |")
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = GPT(preset(name, vocab_size=tok.vocab_size)).eval()
        for batch in (1, 8):
            plain = tokens_per_second(model, tok, batch, None, args.trials)
            ruled = tokens_per_second(model, tok, batch, json.dumps(SCHEMA), args.trials)
            print(f"| {name} | {batch} | {plain:.1f} | {ruled:.1f} | {1 - ruled / plain:.0%} |")
    texts = generate(
        model, tok, [""] * 8, json_schema=json.dumps(SCHEMA), max_new_tokens=128, seed=1, top_k=0, include_prompt=False
    )
    engines = mask_engines(tok, [t for t in texts if t.endswith("}")] or texts)
    print("\n| grammar engine | microseconds per step (allowed tokens of one row) |\n| --- | --- |")
    for engine, us in engines.items():
        print(f"| {engine} | {us:.1f} |")


if __name__ == "__main__":
    main()
