"""Checks that need a CUDA GPU; skipped without one (CI has none; run them where a GPU is lent)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gptforge.checkpoint import load_model
from gptforge.config import GPTConfig
from gptforge.model import GPT
from gptforge.train import RunData, TrainConfig, Trainer, pick_precision

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_auto_precision_is_bf16_on_cuda():
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert pick_precision("auto", torch.device("cuda")) == expected


@pytest.mark.parametrize("compile", [False, True])
def test_bf16_training_on_cuda_learns_and_saves(tmp_path, compile):
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(vocab_size=64, n_positions=32, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    )
    tokens = np.tile(np.arange(64, dtype=np.uint16), 500)  # a pattern a model learns in a few steps
    cfg = TrainConfig(
        out_dir=str(tmp_path / "run"),
        max_steps=60,
        batch_size=8,
        block_size=32,
        device="cuda",
        compile=compile,
        log_interval=10,
        eval_interval=None,
        save_minutes=None,
        progress=False,
        plot=False,
        learning_rate=3e-3,
    )
    result = Trainer(model, RunData(tokens, tokens[:4096], 1.0), cfg).run()
    assert result.val_loss < 1.0  # far below log(64) = 4.16
    reloaded = load_model(tmp_path / "run", device="cuda")
    x = torch.from_numpy(tokens[:32].astype(np.int64))[None].cuda()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x)[0], model.eval()(x)[0])
