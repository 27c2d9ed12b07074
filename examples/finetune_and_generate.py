"""Fine-tune a pretrained GPT-2 on a book or any text, report validation perplexity, and generate.

    python examples/finetune_and_generate.py book.txt --init gpt2 --minutes 30 --prompt "The old lighthouse keeper"
    python examples/finetune_and_generate.py book.txt --init ./my-gpt2-folder --minutes 5

--init is a model folder with its tokenizer (written by gptforge or transformers) or a hub id (gpt2,
gpt2-medium, ...; downloaded once, needs `pip install 'gptforge[hub]'` and the network). The text gets a
seeded 90/10 train/validation split. The same run on the command line:

    gptforge train --init gpt2 --train-file book.txt --block-size 200 --batch-size 1 --grad-accum 4 --max-time 30m
    --out output
"""

from __future__ import annotations

import argparse

from gptforge import GPTForge
from gptforge.train import run_training


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("corpus", help="UTF-8 text file to fine-tune on")
    ap.add_argument("--init", default="gpt2", help="pretrained model folder or hub id (default: gpt2)")
    ap.add_argument("--out", default="finetuned", help="run folder to write (default: finetuned)")
    ap.add_argument("--minutes", type=float, default=10.0, help="training time (default: 10)")
    ap.add_argument("--block-size", type=int, default=200, help="tokens per training sequence (default: 200)")
    ap.add_argument("--batch-size", type=int, default=1, help="sequences per micro-step (default: 1)")
    ap.add_argument("--grad-accum", type=int, default=4, help="micro-steps per optimizer step (default: 4)")
    ap.add_argument("--prompt", default="The old lighthouse keeper", help="prompt for the samples")
    ap.add_argument("--overwrite", action="store_true", help="replace a previous run in --out")
    args = ap.parse_args()

    before = GPTForge(args.init)
    print(f"pretrained: {before}")
    result = run_training(
        [args.corpus],
        init=args.init,
        out_dir=args.out,
        max_time=args.minutes * 60,
        block_size=min(args.block_size, before.config.n_positions),
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        eval_interval=200,
        sample_prompt=args.prompt,
        overwrite=args.overwrite,
    )
    ai = GPTForge(args.out)
    val = args.out + "/data"  # the validation split that training held out
    print(
        f"validation perplexity: pretrained {before.evaluate(val).perplexity:.2f} -> "
        f"fine-tuned {ai.evaluate(val).perplexity:.2f} after {result.step} steps"
    )
    ai.generate(
        n=2,
        prompt=args.prompt,
        max_new_tokens=120,
        temperature=0.8,
        top_k=40,
        top_p=0.9,
        repetition_penalty=1.2,
        seed=42,
    )
    print(f"model folder: {args.out}  (gptforge generate {args.out} --prompt {args.prompt!r} --seed 42)")


if __name__ == "__main__":
    main()
