"""Train a small GPT-2 from scratch on short texts, one sample per line (jokes, titles, tweets), then
generate new ones. Each line is wrapped in <|endoftext|>, so the model learns where a sample ends.

    python examples/short_texts.py titles.txt --minutes 5
    python examples/short_texts.py jokes.txt --minutes 2 --out jokes-model --vocab-size 3000

Runs on the CPU in minutes; a GPU is used when there is one. Afterwards:
    gptforge generate short-model --num-samples 10 --temperature 0.8
"""

from __future__ import annotations

import argparse

from gptforge import GPTForge, TokenDataset, build_gpt2_config, train_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("corpus", help="UTF-8 text file, one sample per line")
    ap.add_argument("--out", default="short-model", help="model folder to write (default: short-model)")
    ap.add_argument("--minutes", type=float, default=5.0, help="training time (default: 5)")
    ap.add_argument("--vocab-size", type=int, default=5000, help="BPE vocabulary (default: 5000)")
    ap.add_argument("--block-size", type=int, default=64, help="context length in tokens (default: 64)")
    ap.add_argument("--overwrite", action="store_true", help="replace a previous run in --out")
    args = ap.parse_args()

    tok = train_tokenizer(
        args.corpus, vocab_size=args.vocab_size, out_dir=None
    )  # kept in memory; training saves it in the model folder
    print(f"tokenizer: {tok.vocab_size} tokens")
    data = TokenDataset(args.corpus, tokenizer=tok, block_size=args.block_size, line_by_line=True, val_fraction=0.05)
    print(f"data: {len(data.train):,} training tokens, {len(data.val):,} validation tokens")
    # A small model: short samples need little context, and a few minutes of CPU feed only a few million parameters.
    config = build_gpt2_config(
        vocab_size=tok.vocab_size, max_length=args.block_size, dropout=0.0, n_embd=192, n_layer=4, n_head=6
    )
    ai = GPTForge(config=config, tokenizer=tok)
    print(ai)
    result = ai.train(
        data,
        batch_size=32,
        num_steps=None,
        max_time=args.minutes * 60,
        output_dir=args.out,
        eval_interval=100,
        overwrite=args.overwrite,
    )
    if result.val_perplexity is not None:
        print(
            f"validation perplexity {result.val_perplexity:.2f} ({result.val_bits_per_byte:.3f} bits per byte) "
            f"after {result.step} steps"
        )
    print("ten new samples:")
    for text in ai.generate(n=10, max_length=args.block_size, temperature=0.8, top_p=0.95, seed=0, return_as_list=True):
        print(" *", text.strip())
    print(f"model folder: {args.out}  (gptforge generate {args.out} --num-samples 10)")


if __name__ == "__main__":
    main()
