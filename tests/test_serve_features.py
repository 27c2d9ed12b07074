"""The server's newer features, in-process and fast: logit_bias, the prefix cache, several adapters on one base,
and the Prometheus metrics (a real server for the scrape and for adapters over HTTP, marked slow)."""

from __future__ import annotations

import pytest
import torch

from gptforge.config import GPTConfig
from gptforge.errors import OptionError
from gptforge.generate import SamplingOptions, generate_ids
from gptforge.model import GPT
from gptforge.tokenizer import train_tokenizer


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
