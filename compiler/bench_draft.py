"""``kiln bench TARGET --draft DRAFT``: speculative decoding's speed against the target alone,
its draft's acceptance rate, and whether its greedy tokens are the target's own.

The runs with and without the draft alternate, both through ``generate`` (the same sampler and
bookkeeping), so a machine whose load drifts during the minute a benchmark takes slows both
alike and the speed-up compares runs of the same moments."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DraftFigures:
    tokens_per_s: float         # the fastest run's decode rate with the draft
    alone_tokens_per_s: float   # the fastest run's without it, alternating with those
    acceptance_rate: float      # accepted proposals / proposals, in the fastest drafted run
    draft_tokens: int
    same_tokens: bool           # every drafted run's greedy tokens equal the target's alone
    new_tokens: int

    @property
    def speedup(self) -> float | None:
        return self.tokens_per_s / self.alone_tokens_per_s if self.alone_tokens_per_s else None

    def rows(self) -> list[tuple[str, str]]:
        return [(f"decode with draft ({self.new_tokens} tokens, greedy, k={self.draft_tokens})",
                 f"{self.tokens_per_s:.1f} tokens/s"),
                ("decode without draft (runs alternating with those)", f"{self.alone_tokens_per_s:.1f} tokens/s"),
                ("speed-up with the draft", f"{self.speedup:.2f}x" if self.speedup else "-"),
                ("draft acceptance rate", f"{self.acceptance_rate:.1%}"),
                ("greedy tokens equal the target's", "yes" if self.same_tokens else "NO")]

    def as_json(self) -> dict:
        return {"draft_decode_tokens_per_s": self.tokens_per_s, "draft_alone_tokens_per_s": self.alone_tokens_per_s,
                "draft_speedup": self.speedup, "draft_acceptance_rate": self.acceptance_rate,
                "draft_tokens": self.draft_tokens, "draft_same_tokens": self.same_tokens}


def measure(model, draft, prompt: list[int], new_tokens: int, repeats: int, draft_tokens: int) -> DraftFigures:
    """Greedy decoding of ``new_tokens`` after ``prompt`` (EOS ignored, so every run makes as
    many), ``repeats`` runs without and with the draft in turn, the fastest of each."""
    alone = drafted = None
    same = True
    for _ in range(max(repeats, 1)):
        a = model.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True)
        d = model.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True, draft=draft, draft_tokens=draft_tokens)
        same = same and d.ids == a.ids
        if alone is None or a.timings["tokens_per_s"] > alone.timings["tokens_per_s"]:
            alone = a
        if drafted is None or d.timings["tokens_per_s"] > drafted.timings["tokens_per_s"]:
            drafted = d
    return DraftFigures(tokens_per_s=drafted.timings["tokens_per_s"], alone_tokens_per_s=alone.timings["tokens_per_s"],
                        acceptance_rate=drafted.timings["acceptance_rate"], draft_tokens=draft_tokens,
                        same_tokens=same, new_tokens=len(drafted.ids))
