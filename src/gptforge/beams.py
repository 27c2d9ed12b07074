"""Beam search: a scheduler over generate.py's static batch and sampling.py's logits processors.

Each prompt keeps `num_beams` running beams, rows of one `StaticBatch` whose KV cache follows the beams
(`reorder`, an index_select per step). Scoring is that of transformers' `generate(num_beams=...)`, step for step,
so that the same weights give the same tokens:

- a beam's next-token scores are the log-softmax of its logits, put through the same processors as greedy
  decoding (repetition and OpenAI penalties, no-repeat n-grams, min_new_tokens), plus the beam's running sum;
- of all the prompt's continuations the best 2 x num_beams are candidates (so that num_beams of them can go on
  even when every beam's best continuation is end of text); the best num_beams that do not end become the beams;
- a candidate that ends (end of text, or max_new_tokens reached) and is among the best num_beams candidates is a
  finished hypothesis, scored sum / length ** length_penalty, the length counting its new tokens with end of
  text; the prompt keeps its num_beams best hypotheses;
- a prompt's search closes when its best beam can no longer beat its worst hypothesis (the best beam's sum over
  the current length ** length_penalty, or, with early_stopping="never" and length_penalty > 0, over
  max_new_tokens ** length_penalty); with early_stopping=True also as soon as it holds num_beams hypotheses.
  Decoding stops when every prompt's search is closed or max_new_tokens is reached.

Beam search is deterministic: `do_sample=True` is refused with num_beams > 1 (options.py), as are streaming and
stop strings (generate.py), which need text before the search knows which hypothesis wins.
"""

from __future__ import annotations

import copy

import torch

from .batching import StaticBatch
from .model import GPT
from .options import SamplingOptions
from .sampling import NGramBan, process_logits

NEG = -1.0e9  # the score of what may not be chosen (an empty hypothesis slot, a blocked candidate)


class BeamSearch:
    """The search for P prompts with N beams each: prompt p's beams are rows p*N .. p*N+N-1 of the batch."""

    def __init__(self, batch, prompts: list[list[int]], opts: SamplingOptions, eos_id: int | None, vocab: int):
        self.batch, self.opts, self.eos = batch, opts, eos_id
        self.P, self.N, self.t = len(prompts), opts.num_beams, 0  # t: new tokens so far
        rows = [p for p in prompts for _ in range(self.N)]
        dev = batch.tokens.device
        self.running = torch.zeros(self.P, self.N, device=dev)
        self.running[:, 1:] = NEG  # the beams start as copies of the prompt: only the first may be continued
        self.scores = torch.full((self.P, self.N), NEG, device=dev)  # finished hypotheses, best first
        self.done = torch.zeros((self.P, self.N), dtype=torch.bool, device=dev)
        self.lengths = torch.zeros((self.P, self.N), dtype=torch.long, device=dev)
        self.hyps = torch.zeros((self.P, self.N, opts.max_new_tokens), dtype=torch.long, device=dev)
        self.open = torch.ones((self.P, 1), dtype=torch.bool, device=dev)  # the prompt's search may still improve
        self.seen = self.counts = self.ngrams = None
        if opts.repetition_penalty != 1.0:
            self.seen = torch.zeros((len(rows), vocab), dtype=torch.bool, device=dev)
            for i, p in enumerate(rows):
                self.seen[i, p] = True
        if opts.presence_penalty or opts.frequency_penalty:
            self.counts = torch.zeros((len(rows), vocab), device=dev)
        if opts.no_repeat_ngram_size:
            self.ngrams = [NGramBan(opts.no_repeat_ngram_size, p) for p in rows]

    def step(self) -> bool:
        """Choose every beam's next token; False when the search is over (the batch is then not advanced)."""
        P, N = self.P, self.N
        logp = torch.log_softmax(self.batch.logits.float(), dim=-1)
        logp = process_logits(logp, self.opts, self.t, self.eos, self.seen, self.ngrams, self.counts)
        vocab = logp.size(-1)
        total = (logp.view(P, N, vocab) + self.running[:, :, None]).view(P, N * vocab)
        cand, flat = total.topk(2 * N, dim=-1)  # (P, 2N), best first
        parent, token = flat // vocab, flat % vocab
        self.t += 1
        ends = token == self.eos if self.eos is not None else torch.zeros_like(token, dtype=torch.bool)
        if self.t >= self.opts.max_new_tokens:
            ends[:] = True
        self._finish(cand, parent, token, ends)
        alive = cand + ends.float() * NEG  # beams that ended go no further
        best = alive.topk(N, dim=-1).indices
        self.running = alive.gather(1, best)
        rows = (parent.gather(1, best) + torch.arange(P, device=best.device)[:, None] * N).view(-1)
        tokens = token.gather(1, best).view(-1)
        self._close()
        if not self.open.any() or (self.opts.early_stopping is True and self.done.all()) or ends.all():
            return False
        self._follow(rows, tokens)
        self.batch.advance(tokens)
        return True

    def _finish(self, cand, parent, token, ends) -> None:
        """Keep each prompt's N best hypotheses among those it had and the candidates that just ended."""
        new = ends.clone()
        new[:, self.N :] = False  # the extra candidates are only there so that N beams go on
        blocked = ~self.open | (self.done.all(-1, keepdim=True) & (self.opts.early_stopping is True))
        if not (new & ~blocked).any():
            return
        scores = cand / (self.t**self.opts.length_penalty)
        scores = scores + blocked.float() * NEG + (~new).float() * NEG
        seqs = torch.zeros_like(self.hyps[:, :1]).expand(-1, 2 * self.N, -1).clone()
        so_far = self.batch.generated().view(self.P, self.N, -1)  # (P, N, t - 1)
        seqs[:, :, : self.t - 1] = so_far.gather(1, parent[:, :, None].expand(-1, -1, so_far.size(-1)))
        seqs[:, :, self.t - 1] = token
        merged = torch.cat([self.scores, scores], 1)
        keep = merged.topk(self.N, dim=-1).indices
        self.scores = merged.gather(1, keep)
        self.done = torch.cat([self.done, new], 1).gather(1, keep)
        self.lengths = torch.cat([self.lengths, torch.full_like(new, self.t, dtype=torch.long)], 1).gather(1, keep)
        hyps = torch.cat([self.hyps, seqs], 1)
        self.hyps = hyps.gather(1, keep[:, :, None].expand(-1, -1, hyps.size(-1)))

    def _close(self) -> None:
        """Close the prompts whose best running beam cannot (or, by transformers' estimate, will not) beat their
        worst hypothesis; a prompt with an empty hypothesis slot stays open."""
        lp, es = self.opts.length_penalty, self.opts.early_stopping
        length = self.opts.max_new_tokens if es == "never" and lp > 0 else self.t
        best = self.running[:, :1] / (length**lp)
        worst = torch.where(self.done, self.scores.min(-1, keepdim=True).values, torch.full_like(self.scores, NEG))
        self.open &= (best > worst).any(-1, keepdim=True)

    def _follow(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """Row i continues the old row rows[i] with tokens[i]: cache and processor state follow."""
        at = torch.arange(rows.numel(), device=rows.device)
        if not torch.equal(rows, at):  # often every beam continues itself: then nothing moves
            self.batch.reorder(rows)
            self.seen = None if self.seen is None else self.seen.index_select(0, rows)
            self.counts = None if self.counts is None else self.counts.index_select(0, rows)
            self.ngrams = None if self.ngrams is None else [copy.deepcopy(self.ngrams[r]) for r in rows.tolist()]
        if self.seen is not None:
            self.seen[at, tokens] = True
        if self.counts is not None:
            self.counts[at, tokens] += 1
        for ban, tok in zip(self.ngrams or (), tokens.tolist()):
            ban.add(tok)

    def results(self) -> list[list[int]]:
        """The num_samples best hypotheses of each prompt, best first: their new tokens without end of text."""
        out = []
        for p in range(self.P):
            for j in range(self.opts.num_samples):
                ids = self.hyps[p, j, : int(self.lengths[p, j])].tolist()
                out.append(ids[:-1] if ids and ids[-1] == self.eos else ids)
        return out


def beam_search(
    model: GPT, prompts: list[list[int]], opts: SamplingOptions, eos_id: int | None, keep: int, bar=None
) -> list[list[int]]:
    """The num_samples best hypotheses of each prompt (prompt 0's first, best first), as new token ids without
    end of text. `batch_size` rows run together: batch_size // num_beams prompts (at least one) at a time;
    `keep` is the tokens kept when a beam reaches the context (generate_ids' context_keep)."""
    per_batch = max(1, opts.batch_size // opts.num_beams)
    pad = eos_id if eos_id is not None else 0
    out: list[list[int]] = []
    for start in range(0, len(prompts), per_batch):
        group = prompts[start : start + per_batch]
        if opts.max_new_tokens == 0:
            out += [[] for _ in range(len(group) * opts.num_samples)]
            continue
        batch = StaticBatch(model, [p for p in group for _ in range(opts.num_beams)], pad, opts.max_new_tokens, keep)
        search = BeamSearch(batch, group, opts, eos_id, model.config.vocab_size)
        while search.step():
            pass
        out += search.results()
        if bar is not None:
            bar.update(len(group) * opts.num_samples)
    return out


__all__ = ["BeamSearch", "beam_search"]
