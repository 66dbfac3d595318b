"""``kiln bench TARGET --draft DRAFT``: speculative decoding's speed against the target alone,
its draft's acceptance rate, and whether its greedy tokens are the target's own."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DraftFigures:
    tokens_per_s: float         # the fastest run's decode rate with the draft
    acceptance_rate: float      # accepted proposals / proposals, over that run
    draft_tokens: int
    same_tokens: bool           # the greedy tokens equal the target's alone
    new_tokens: int

    def rows(self, alone_tokens_per_s: float) -> list[tuple[str, str]]:
        """The table's rows, the speed-up against the target's own decode rate."""
        return [(f"decode with draft ({self.new_tokens} tokens, greedy, k={self.draft_tokens})",
                 f"{self.tokens_per_s:.1f} tokens/s"),
                ("draft acceptance rate", f"{self.acceptance_rate:.1%}"),
                ("speed-up over the target alone", f"{self.tokens_per_s / alone_tokens_per_s:.2f}x"
                 if alone_tokens_per_s else "-"),
                ("greedy tokens equal the target's", "yes" if self.same_tokens else "NO")]

    def as_json(self, alone_tokens_per_s: float) -> dict:
        return {"draft_decode_tokens_per_s": self.tokens_per_s, "draft_acceptance_rate": self.acceptance_rate,
                "draft_tokens": self.draft_tokens, "draft_same_tokens": self.same_tokens,
                "draft_speedup": self.tokens_per_s / alone_tokens_per_s if alone_tokens_per_s else None}


def measure(model, draft, prompt: list[int], new_tokens: int, repeats: int, draft_tokens: int) -> DraftFigures:
    """Greedy decoding of ``new_tokens`` after ``prompt`` with the draft (EOS ignored, so every
    run makes as many), the fastest of ``repeats`` runs, checked against the target's tokens
    alone."""
    alone = model.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True).ids
    best = None
    for _ in range(max(repeats, 1)):
        r = model.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True, draft=draft,
                           draft_tokens=draft_tokens)
        if best is None or r.timings["tokens_per_s"] > best.timings["tokens_per_s"]:
            best = r
    return DraftFigures(tokens_per_s=best.timings["tokens_per_s"], acceptance_rate=best.timings["acceptance_rate"],
                        draft_tokens=draft_tokens, same_tokens=best.ids == alone, new_tokens=len(best.ids))
