"""Structured output: a tiny random model under a JSON schema or a regular expression writes only what they allow,
through generate, the command line and the server's fields."""

from __future__ import annotations

import json
import re

import pytest
import torch

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from gptforge import GPT, GPTConfig  # noqa: E402
from gptforge.data.vocabulary import train_tokenizer  # noqa: E402
from gptforge.errors import OptionError  # noqa: E402
from gptforge.generate import generate, generate_ids  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tiny(sample_text):
    tok = train_tokenizer([], vocab_size=400, texts=[sample_text], out_dir=None)
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=tok.vocab_size,
        n_positions=256,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=tok.eos_id,
        eos_token_id=tok.eos_id,
    )
    return GPT(config).eval(), tok


def test_fifty_samples_under_a_schema_all_validate(tiny):
    model, tok = tiny
    outs = generate(
        model,
        tok,
        "",
        json_schema=json.dumps(SCHEMA),
        num_samples=50,
        max_new_tokens=150,
        seed=0,
        top_k=0,
        temperature=1.2,
        include_prompt=False,
        batch_size=16,
    )
    for text in outs:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(outs)) > 10  # sampled, not one text repeated
    free = generate(model, tok, "", num_samples=5, max_new_tokens=30, seed=0, top_k=0, include_prompt=False)
    assert not any(t.startswith("{") for t in free)  # the same model unconstrained writes no JSON


def test_a_regex_and_a_choice_are_matched_whole(tiny):
    model, tok = tiny
    outs = generate(
        model,
        tok,
        "Date:",
        regex=r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]",
        num_samples=8,
        seed=1,
        max_new_tokens=20,
        include_prompt=False,
    )
    assert all(re.fullmatch(r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]", t) for t in outs), outs
    assert set(generate(model, tok, "", regex="(yes|no)", num_samples=10, seed=2, include_prompt=False)) <= {
        "yes",
        "no",
    }


def test_greedy_under_a_schema_is_the_best_allowed_token_at_each_step(tiny):
    model, tok = tiny
    out = generate(model, tok, "", regex="(cat|dog|bird)", do_sample=False, include_prompt=False)[0]
    ids = tok.encode(out)
    first_choices = [tok.encode(w)[0] for w in ("cat", "dog", "bird")]
    logits, _ = model(torch.tensor([[tok.eos_id]]))
    assert ids[0] == max(first_choices, key=lambda t: logits[0, -1, t].item())


def test_bad_schemas_and_regexes_are_one_line(tiny, tmp_path):
    model, tok = tiny
    for bad, match in (
        (dict(regex="(unclosed"), "regex"),
        (dict(json_schema='{"type": 12}'), "json_schema"),
        (dict(json_schema="[1, 2]"), "object"),
        (dict(json_schema=str(tmp_path / "no.json")), "no.json"),
        (dict(json_schema="{}", regex="a"), "not both"),
    ):
        with pytest.raises(OptionError, match=match):
            generate(model, tok, "", **bad)
    with pytest.raises(OptionError, match="tokenizer"):
        generate_ids(model, [1, 2], regex="a+")


def test_cli_json_schema_from_a_file(tiny, tmp_path, capsys):
    from gptforge.checkpoint import save_model
    from gptforge.cli import main

    model, tok = tiny
    folder = save_model(model, tmp_path / "m", tok)
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    argv = [
        "generate",
        str(folder),
        "",
        "--json-schema",
        str(tmp_path / "schema.json"),
        "--num-samples",
        "3",
        "--seed",
        "4",
        "--max-new-tokens",
        "150",
        "--no-prompt",
        "--delimiter",
        "\n---\n",
    ]
    assert main(argv) == 0
    for text in capsys.readouterr().out.strip().split("\n---\n"):
        jsonschema.validate(json.loads(text), SCHEMA)
