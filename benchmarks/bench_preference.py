"""DPO quality and speed, gptforge against trl's DPOTrainer, on the same model, data, steps and settings.

Preference pairs from ../shared/corpora/fortunes_topics: the prompt names a topic ("Topic: science\n"), the chosen
answer is a fortune of that topic, the rejected one a fortune of another topic. A small model is first trained
as a language model on "Topic: <label>\n<fortune>" texts (gptforge, --max-time), then tuned with DPO by gptforge and
by trl from that same folder: the same pairs, batch, learning rate and schedule (linear to zero, no warmup, no
weight decay, clip 1.0), beta, number of steps, fp32 on the CPU, the reference's log-probabilities computed once by
both (trl: precompute_ref_log_probs). Held-out pairs (from test.jsonl) are scored by one function for every model:

  likelihood acc.  share of pairs whose chosen answer has the higher mean token log-probability (meaningful before
                   DPO too);
  reward acc., margin   DPO's implicit reward beta * (log p - log p_ref) summed over the answer: the share of pairs
                   where the chosen one's is higher, and the mean chosen - rejected difference (0 before DPO).

  flock /tmp/gptforge-bench.lock python benchmarks/bench_preference.py [--steps 150] [--lm-time 60] [--pairs 1500]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import cpu_name  # noqa: E402

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "fortunes_topics"
BETA, LR, BATCH, BLOCK = 0.1, 2e-4, 8, 128


def clip(text: str, chars: int = 240) -> str:
    text = " ".join(text.split())
    return text if len(text) <= chars else text[:chars].rsplit(" ", 1)[0]


def make_pairs(rows: list[dict], seed: int, limit: int | None = None) -> list[dict]:
    rng = random.Random(seed)
    by_label: dict = {}
    for r in rows:
        by_label.setdefault(r["label"], []).append(clip(r["text"]))
    pairs = []
    for r in rows[:limit]:
        other = rng.choice([k for k in by_label if k != r["label"]])
        pairs.append(
            {"prompt": f"Topic: {r['label']}\n", "chosen": clip(r["text"]), "rejected": rng.choice(by_label[other])}
        )
    return pairs


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def held_out_figures(folder, ref_logps, pairs, tokenizer) -> dict:
    """Likelihood accuracy, implicit-reward accuracy and margin of a model folder on the held-out pairs."""
    from gptforge.checkpoint import load_model
    from gptforge.train.preference import pair_logps

    model = load_model(folder)
    logps, counts = pair_logps(model, pairs, 32, tokenizer.pad_id, "cpu")
    mean = logps / counts.clamp(min=1)
    rewards = BETA * (logps - ref_logps)
    d = rewards[:, 0] - rewards[:, 1]
    return {
        "likelihood_acc": float((mean[:, 0] > mean[:, 1]).float().mean()),
        "reward_acc": float((d > 0).float().mean()),
        "margin": float(d.mean()),
    }


def train_lm(work: Path, seconds: float, rows: list[dict]) -> Path:
    from gptforge.train.pipeline import run_training

    text = "\n\n".join(f"Topic: {r['label']}\n{clip(r['text'])}" for r in rows)
    (work / "lm.txt").write_text(text)
    run_training(
        [str(work / "lm.txt")], size="tiny", vocab_size=2000, max_time=seconds, out_dir=str(work / "lm"),
        block_size=BLOCK, progress=False, plot=False, log=lambda m: None, memorization=False,
    )  # fmt: skip
    return work / "lm"


def run_gptforge(work: Path, lm: Path, train_file: Path, test_file: Path, name: str, **length) -> tuple:
    """(seconds per step, wall seconds, steps) of a gptforge DPO run of `length` (max_steps or max_time)."""
    from gptforge.options import PreferenceOptions
    from gptforge.train.pipeline import run_training

    start = time.perf_counter()
    result = run_training(
        [str(train_file)], eval_inputs=[str(test_file)], init=str(lm), preference=PreferenceOptions("dpo", BETA),
        out_dir=str(work / name), **length, batch_size=BATCH, block_size=BLOCK, learning_rate=LR, schedule="linear",
        min_lr_ratio=0.0, warmup_steps=0, weight_decay=0.0, grad_clip=1.0, eval_strategy="no", save_strategy="no",
        progress=False, plot=False, log=lambda m: None, log_interval=50,
    )  # fmt: skip
    wall = time.perf_counter() - start
    elapsed = [r["elapsed"] for r in result.history if "elapsed" in r][-1]
    return elapsed / result.step, wall, result.step


def run_trl(work: Path, lm: Path, train_file: Path, steps: int) -> tuple[float, float]:
    import transformers
    import trl
    from datasets import Dataset

    rows = [json.loads(line) for line in train_file.read_text().splitlines()]
    start = time.perf_counter()
    args = trl.DPOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=BATCH, max_steps=steps, learning_rate=LR,
        lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, beta=BETA,
        max_length=BLOCK, precompute_ref_log_probs=True, use_cpu=True, bf16=False, report_to=[],
        save_strategy="no", logging_steps=50, disable_tqdm=True, seed=0, dataloader_num_workers=0,
        gradient_checkpointing=False,  # trl's default is on; gptforge's is off: the same work per step
    )  # fmt: skip
    trainer = trl.DPOTrainer(
        model=transformers.AutoModelForCausalLM.from_pretrained(lm),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=transformers.AutoTokenizer.from_pretrained(lm),
    )
    out = trainer.train()
    trainer.save_model(str(work / "trl" / "final"))
    wall = time.perf_counter() - start
    return out.metrics["train_runtime"] / steps, wall, out.metrics["train_runtime"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150, help="DPO optimizer steps for each trainer")
    p.add_argument("--lm-time", type=float, default=60, help="seconds of language-model training first")
    p.add_argument("--held-out", type=int, default=400, help="held-out pairs scored")
    p.add_argument("--pairs", type=int, default=1500, help="training pairs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--corpus", type=Path, default=CORPUS, help="the fortunes_topics folder")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from gptforge.chat import ChatTemplate, template_of
    from gptforge.checkpoint import load_model
    from gptforge.data.preferences import read_pairs
    from gptforge.tokenizer import load_tokenizer
    from gptforge.train.preference import pair_logps

    work = Path(tempfile.mkdtemp(prefix="bench_pref_"))
    train_rows = [json.loads(line) for line in (args.corpus / "train.jsonl").read_text().splitlines()]
    test_rows = [json.loads(line) for line in (args.corpus / "test.jsonl").read_text().splitlines()]
    train_file = write_jsonl(work / "train_pairs.jsonl", make_pairs(train_rows, 0, args.pairs))
    test_file = write_jsonl(work / "test_pairs.jsonl", make_pairs(test_rows, 1, args.held_out))
    lm = train_lm(work, args.lm_time, train_rows)
    tok = load_tokenizer(lm)
    held = read_pairs([test_file], tok, BLOCK + 1, ChatTemplate(template_of(tok), tok))
    ref = pair_logps(load_model(lm), held, 32, tok.pad_id, "cpu")[0]
    rows = {"before DPO (the LM)": (held_out_figures(lm, ref, held, tok), None, None)}
    step, wall, _ = run_gptforge(work, lm, train_file, test_file, "gf", max_steps=args.steps)
    rows[f"gptforge DPO, {args.steps} steps"] = (held_out_figures(work / "gf", ref, held, tok), step, wall)
    step, wall, seconds = run_trl(work, lm, train_file, args.steps)
    rows[f"trl DPOTrainer, {args.steps} steps"] = (held_out_figures(work / "trl" / "final", ref, held, tok), step, wall)
    step, wall, steps = run_gptforge(work, lm, train_file, test_file, "gf_time", max_time=seconds)
    name = f"gptforge DPO, trl's {seconds:.0f} s ({steps} steps)"
    rows[name] = (held_out_figures(work / "gf_time", ref, held, tok), step, wall)

    print(f"machine: {cpu_name()}, {args.threads} threads; torch {torch.__version__}")
    print(
        f"{min(args.pairs, len(train_rows)):,} training pairs, {len(held):,} held-out; {args.steps} steps of "
        f"{BATCH} pairs, lr {LR}, "
        f"beta {BETA}, block {BLOCK}; LM: tiny, {args.lm_time:g} s"
    )
    print("| model | likelihood acc. | reward acc. | reward margin | s/step | wall s (set-up + steps) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, (f, step, wall) in rows.items():
        s = f"{step:.3f}" if step else "-"
        w = f"{wall:.0f}" if wall else "-"
        print(f"| {name} | {f['likelihood_acc']:.3f} | {f['reward_acc']:.3f} | {f['margin']:.3f} | {s} | {w} |")


if __name__ == "__main__":
    main()
