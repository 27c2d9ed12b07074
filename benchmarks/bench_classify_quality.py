"""Classification quality on fortunes_topics: gptforge against a TF-IDF character n-gram logistic regression,
both trained on train.jsonl and scored on test.jsonl in the same run.

gptforge's recipe, all inside one wall-clock budget (default 15 minutes, everything counted: tokenizer, data
preparation, language-model pretraining, classifier training, test evaluation):

1. a byte-level BPE tokenizer trained on the training texts;
2. a small GPT-2 language model pretrained from scratch on the training texts only (`gptforge train`, AdamW:
   the from-scratch defaults' Muon learns these few texts by heart sooner, docs/benchmarks.md);
3. a classifier with that body and a new head (`gptforge classify train --init LM`), its best checkpoint
   chosen by macro-F1 on a stratified 10% of the training examples, trained with random spans of the texts
   (`classify train --crop 0.5`, docs/classify.md; `--clf-crop 0` turns them off);
4. that best classifier scored on test.jsonl.

The baseline is TF-IDF of character 2-5-grams + logistic regression (C=10), as in the corpus README.

    python benchmarks/bench_classify_quality.py                       # the 15-minute recipe
    python benchmarks/bench_classify_quality.py --lm-minutes 2 --clf-minutes 2 --out /tmp/q   # a quick look
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "fortunes_topics"


def baseline(train: list[dict], test: list[dict]) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    start = time.perf_counter()
    vec = TfidfVectorizer(analyzer="char", ngram_range=(2, 5), sublinear_tf=True)
    x = vec.fit_transform([r["text"] for r in train])
    clf = LogisticRegression(C=10, max_iter=2000).fit(x, [r["label"] for r in train])
    pred = clf.predict(vec.transform([r["text"] for r in test]))
    truth = [r["label"] for r in test]
    return {
        "accuracy": accuracy_score(truth, pred),
        "macro_f1": f1_score(truth, pred, average="macro"),
        "seconds": time.perf_counter() - start,
    }


def gptforge_recipe(args, out: Path) -> dict:
    from gptforge.api import GPTForgeClassifier
    from gptforge.data.vocabulary import train_tokenizer
    from gptforge.train.pipeline import run_training

    start = time.perf_counter()
    train_file, log = (
        CORPUS / "train.jsonl",
        (lambda m: print(f"[{time.perf_counter() - start:6.0f}s] {m}", flush=True)),
    )
    texts = [json.loads(line)["text"] for line in train_file.read_text().splitlines()]
    tok = train_tokenizer([], vocab_size=args.vocab_size, texts=texts, out_dir=out / "tokenizer")
    log(f"tokenizer: {tok.vocab_size} tokens")
    size = dict(
        n_layer=args.n_layer,
        n_embd=args.n_embd,
        n_head=args.n_embd // 64,
        n_positions=args.context,
        resid_pdrop=args.lm_dropout,
        embd_pdrop=args.lm_dropout,
        attn_pdrop=args.lm_dropout,
    )
    lm = run_training(
        [str(train_file)],
        tokenizer=str(out / "tokenizer"),
        size="tiny",
        model_overrides=size,
        read_options={"field": "text"},
        out_dir=str(out / "lm"),
        max_time=args.lm_minutes * 60,
        batch_size=args.lm_batch,
        learning_rate=args.lm_lr,
        optimizer=args.lm_optimizer,
        schedule=args.lm_schedule,
        min_lr_ratio=args.lm_min_lr_ratio,
        ema=args.lm_ema,
        eval_interval=args.lm_eval_interval or 10**9,
        progress=False,
        plot=False,
        save_minutes=None,
        log=log,
    )
    log(f"language model: {lm.step} steps, validation loss {lm.val_loss:.3f}")
    lm_seconds = time.perf_counter() - start
    left = args.total_minutes * 60 - (time.perf_counter() - start) - args.reserve_seconds
    clf = GPTForgeClassifier.train(
        str(train_file),
        init=str(out / "lm"),
        output_dir=out / "clf",
        max_time=max(60.0, left),
        batch_size=args.clf_batch,
        learning_rate=args.clf_lr,
        warmup_steps=args.clf_warmup,
        weight_decay=0.01,
        eval_interval=args.clf_eval_interval,
        progress=False,
        plot=False,
        save_minutes=None,
        device="cpu",
        lm_weight=args.lm_weight,
        dropout=args.clf_dropout,
        balance=args.balance,
        ema=args.clf_ema,
        crop=args.clf_crop,
    )
    best = GPTForgeClassifier(out / "clf" / "best", device="cpu")
    m = best.evaluate(str(CORPUS / "test.jsonl"), batch_size=64)
    return {
        "accuracy": m["accuracy"],
        "macro_f1": m["macro_f1"],
        "seconds": time.perf_counter() - start,
        "lm_seconds": lm_seconds,
        "lm_steps": lm.step,
        "clf_steps": clf.result.step,
        "per_class": m["per_class"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/gptforge-bench-classify", help="scratch folder (replaced)")
    p.add_argument("--total-minutes", type=float, default=15.0, help="the whole gptforge recipe's budget")
    p.add_argument("--lm-minutes", type=float, default=8.0, help="language-model pretraining")
    p.add_argument("--reserve-seconds", type=float, default=45.0, help="kept for the final evaluations")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--lm-batch", type=int, default=16)
    # the language model's optimizer: AdamW with a cosine and no weight average, as measured; gptforge train's
    # from-scratch defaults (Muon, wsd, the average; `--lm-optimizer muon --lm-schedule wsd --lm-min-lr-ratio 0
    # --lm-ema 0.995 --lm-lr 2e-3`) overfit these 240K tokens sooner in the same minutes (docs/benchmarks.md)
    p.add_argument("--lm-lr", type=float, default=3e-3, help="gptforge train --lr")
    p.add_argument("--lm-optimizer", default="adamw", help="gptforge train --optimizer (adamw, muon)")
    p.add_argument("--lm-schedule", default="cosine", help="gptforge train --schedule (cosine, wsd, ...)")
    p.add_argument("--lm-min-lr-ratio", type=float, default=0.1, help="gptforge train --min-lr-ratio")
    p.add_argument("--lm-ema", type=float, default=0.0, help="gptforge train --ema (0: no weight average)")
    p.add_argument("--clf-batch", type=int, default=32)
    p.add_argument("--clf-lr", type=float, default=5e-4)
    p.add_argument("--clf-warmup", type=int, default=30)
    p.add_argument("--clf-eval-interval", type=int, default=100)
    p.add_argument("--lm-weight", type=float, default=0.5, help="classify train --lm-weight (auxiliary LM loss)")
    p.add_argument("--clf-dropout", type=float, default=0.1, help="classify train --dropout")
    p.add_argument("--balance", default="weights", help="classify train --balance")
    p.add_argument("--clf-ema", type=float, default=None, help="classify train --ema (a weight average)")
    p.add_argument("--clf-crop", type=float, default=0.5, help="classify train --crop (random spans of the texts)")
    p.add_argument("--lm-eval-interval", type=int, default=0, help="evaluate the LM every N steps (0: only at the end)")
    p.add_argument("--lm-dropout", type=float, default=0.0, help="the language model's dropout")
    args = p.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    read = lambda name: [json.loads(line) for line in (CORPUS / name).read_text().splitlines()]  # noqa: E731
    train, test = read("train.jsonl"), read("test.jsonl")
    base = baseline(train, test)
    ours = gptforge_recipe(args, out)
    print(f"\n{len(train):,} training / {len(test):,} test examples, 8 topics; recipe: {vars(args)}\n")
    print("| model | test accuracy | test macro-F1 | wall time |")
    print("| --- | --- | --- | --- |")
    print(
        f"| TF-IDF char 2-5-grams + logistic regression (C=10) | {base['accuracy']:.3f} | {base['macro_f1']:.3f} | "
        f"{base['seconds']:.0f} s |"
    )
    print(
        f"| gptforge: LM pretrained on the train texts ({ours['lm_steps']} steps, {ours['lm_seconds']:.0f} s) + "
        f"classifier ({ours['clf_steps']} steps), best by validation macro-F1 | {ours['accuracy']:.3f} | "
        f"{ours['macro_f1']:.3f} | {ours['seconds']:.0f} s |"
    )
    print("\nper class (gptforge): " + ", ".join(f"{k} F1 {v['f1']:.2f}" for k, v in ours["per_class"].items()))


if __name__ == "__main__":
    main()
