"""Train a small GPT-2 from scratch on Chinese text with a character vocabulary (one token per character),
then generate from a prompt. A character vocabulary suits Chinese: thousands of common characters cover
almost all text, and no character is split into bytes.

    python examples/chinese_chars.py fortunes_zh.txt --minutes 5 --prompt 人生

Characters seen fewer than --min-frequency times become <|unk|>. Blank lines separate documents.
"""

from __future__ import annotations

import argparse

from gptforge import GPTForge, TokenDataset, build_gpt2_config, train_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("corpus", help="UTF-8 text file (documents separated by blank lines)")
    ap.add_argument("--out", default="zh-model", help="model folder to write (default: zh-model)")
    ap.add_argument("--minutes", type=float, default=5.0, help="training time (default: 5)")
    ap.add_argument("--vocab-size", type=int, default=6000, help="at most this many characters (default: 6000)")
    ap.add_argument("--min-frequency", type=int, default=2, help="rarer characters become <|unk|> (default: 2)")
    ap.add_argument("--block-size", type=int, default=128, help="context length in characters (default: 128)")
    ap.add_argument("--prompt", default="人生", help="prompt for the samples (default: 人生)")
    ap.add_argument("--overwrite", action="store_true", help="replace a previous run in --out")
    args = ap.parse_args()

    tok = train_tokenizer(
        args.corpus, vocab_size=args.vocab_size, min_frequency=args.min_frequency, kind="char", out_dir=None
    )  # kept in memory; training saves it in the model folder
    print(f"character vocabulary: {tok.vocab_size} tokens (<|endoftext|>, <|unk|> and the characters)")
    data = TokenDataset(args.corpus, tokenizer=tok, block_size=args.block_size, val_fraction=0.05)
    print(f"data: {len(data.train):,} training characters, {len(data.val):,} validation characters")
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
        sample_prompt=args.prompt,
        overwrite=args.overwrite,
    )
    if result.val_perplexity is not None:
        print(
            f"validation perplexity {result.val_perplexity:.2f} per character "
            f"({result.val_bits_per_byte:.3f} bits per byte) after {result.step} steps"
        )
    ai.generate(n=3, prompt=args.prompt, max_length=args.block_size, temperature=0.8, top_k=40, seed=0)
    print(f"model folder: {args.out}  (gptforge generate {args.out} --prompt {args.prompt})")


if __name__ == "__main__":
    main()
