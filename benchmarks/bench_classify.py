"""Classification speed: gptforge's GPTClassifier against transformers' GPT2ForSequenceClassification, same weights,
same batches, same run.

A training step is forward + cross-entropy + backward + AdamW (fused, the default of both gptforge's and
transformers' Trainer; lr 1e-4, weight decay 0.1) on one right-padded batch of texts of varied length with its
attention mask, dropout 0. Batched prediction is the forward pass (inference mode) over a list of such batches.
Both models get exactly the same tensors; the script first checks they give the same logits. Trials of the two
alternate (order flipped every trial); the median is reported.

    python benchmarks/bench_classify.py                 # both shapes
    python benchmarks/bench_classify.py --shapes small --trials 7
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time

import torch
import torch.nn.functional as F
import transformers

from gptforge.checkpoint import to_hf_state_dict
from gptforge.classify import GPTClassifier, classifier_config
from gptforge.config import preset
from gptforge.inference.packed import cpu_inference_weights

NUM_LABELS = 8
SHAPES = {
    # name: (config fields, training batch, prediction batch, prediction batches, longest text in tokens)
    "small": (
        dict(vocab_size=5000, n_positions=256, n_embd=256, n_layer=8, n_head=8, bos_token_id=0, eos_token_id=0),
        16,
        64,
        4,
        128,
    ),
    "gpt2": (dict(), 8, 32, 2, 128),
}


def build(fields: dict) -> tuple[GPTClassifier, torch.nn.Module]:
    config = preset("gpt2", **fields, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    ours = GPTClassifier(classifier_config(config, [f"c{i}" for i in range(NUM_LABELS)], pad_token_id=0))
    hf_fields = {k: v for k, v in ours.config.to_dict().items() if k not in ("architectures", "id2label", "label2id")}
    hf = transformers.GPT2ForSequenceClassification(
        transformers.GPT2Config(**hf_fields, id2label=dict(enumerate(ours.labels)), attn_implementation="sdpa")
    )
    hf.load_state_dict(to_hf_state_dict(ours.state_dict()), strict=True)
    return ours, hf


def make_batch(g: torch.Generator, n: int, longest: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and labels: lengths spread like short texts (a quarter to all of `longest`)."""
    lengths = torch.randint(longest // 4, longest + 1, (n,), generator=g)
    lengths[0] = longest
    ids = torch.randint(1, vocab, (n, longest), generator=g)
    mask = (torch.arange(longest)[None] < lengths[:, None]).long()
    return ids * mask, mask, torch.randint(0, NUM_LABELS, (n,), generator=g)


def train_step(model, hf: bool, batch):
    ids, mask, y = batch
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)  # both trainers' default

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        if hf:
            loss = model(input_ids=ids, attention_mask=mask, labels=y).loss
        else:
            loss = F.cross_entropy(model(ids, mask), y)
        loss.backward()
        opt.step()

    return step


def predict_run(model, hf: bool, batches):
    def run() -> None:
        with torch.inference_mode(), contextlib.nullcontext() if hf else cpu_inference_weights(model):
            for ids, mask, _ in batches:
                if hf:
                    model(input_ids=ids, attention_mask=mask).logits.softmax(-1)
                else:
                    model(ids, mask).softmax(-1)

    return run


def timed(runs: dict, trials: int) -> dict[str, list[float]]:
    for run in runs.values():
        run()  # warm-up: allocator, optimizer state, packed weights
    times: dict[str, list[float]] = {k: [] for k in runs}
    for trial in range(trials):
        for label in list(runs) if trial % 2 == 0 else list(runs)[::-1]:
            t = time.perf_counter()
            runs[label]()
            times[label].append(time.perf_counter() - t)
    return times


def run_shape(name: str, trials: int) -> list[tuple]:
    fields, train_batch, pred_batch, pred_batches, longest = SHAPES[name]
    torch.manual_seed(0)
    ours, hf = build(fields)
    g = torch.Generator().manual_seed(0)
    batch = make_batch(g, train_batch, longest, ours.config.vocab_size)
    pred = [make_batch(g, pred_batch, longest, ours.config.vocab_size) for _ in range(pred_batches)]
    with torch.no_grad():  # same weights, same batches: same logits
        ids, mask, _ = pred[0]
        diff = (ours.eval()(ids, mask) - hf.eval()(input_ids=ids, attention_mask=mask).logits).abs().max().item()
        assert diff < 1e-4, f"models disagree (logit difference {diff})"
    rows = []
    tokens = int(batch[1].sum())
    ours.train(), hf.train()
    times = timed({"gptforge": train_step(ours, False, batch), "transformers": train_step(hf, True, batch)}, trials)
    rows += summarize(name, f"training step, batch {train_batch} x {longest}", times, tokens)
    ours.eval(), hf.eval()
    tokens = sum(int(b[1].sum()) for b in pred)
    times = timed({"gptforge": predict_run(ours, False, pred), "transformers": predict_run(hf, True, pred)}, trials)
    rows += summarize(name, f"prediction, {pred_batches} batches of {pred_batch} x {longest}", times, tokens)
    return rows


def summarize(shape: str, what: str, times: dict, tokens: int) -> list[tuple]:
    med = {k: statistics.median(v) for k, v in times.items()}
    return [
        (shape, what, label, tokens / med[label], med["transformers"] / med[label], min(ts), max(ts))
        for label, ts in times.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="small,gpt2", help=f"comma-separated, from {list(SHAPES)}")
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.machine()}\n"
    )
    rows = [r for s in args.shapes.split(",") for r in run_shape(s, args.trials)]
    print("| shape | what | implementation | real tokens/s | gptforge speed-up | min / max |")
    print("| --- | --- | --- | --- | --- | --- |")
    for shape, what, label, tps, ratio, lo, hi in rows:
        c = preset("gpt2", **SHAPES[shape][0])
        desc = f"{shape}: {c.n_layer}L {c.n_embd}d vocab {c.vocab_size}"
        print(
            f"| {desc} | {what} | {label} | {tps:,.0f} | {f'{ratio:.2f}x' if label == 'gptforge' else ''} | "
            f"{lo * 1e3:,.0f} / {hi * 1e3:,.0f} ms |"
        )


if __name__ == "__main__":
    main()
