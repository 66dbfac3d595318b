"""``-c/--ctx-size N``, as llama.cpp's: the most tokens one sequence may hold, prompt and
answer together, at most the artifact's own context.

``kiln run`` and ``kiln chat`` cap each answer with :func:`checked`; ``kiln serve`` and
``kiln bench`` lower the session's ``max_length`` with :func:`limit`, so every check the
session, the scheduler and the server make against it (a prompt leaving no room is refused,
``max_tokens`` is capped to what fits) holds N, and the cache never grows past N rows.
"""
from __future__ import annotations


def checked(ctx: int, limit: int | None) -> int:
    """``ctx`` if it lies in 1..``limit`` (the artifact's context; None: unbounded), else a
    ValueError naming the flag and the range."""
    if ctx < 1 or (limit and ctx > limit):
        raise ValueError(f"-c/--ctx-size {ctx}: choose from 1 to {limit}, the tokens this artifact holds"
                         if limit else f"-c/--ctx-size {ctx}: must be at least 1")
    return ctx


def limit(session, ctx: int | None) -> None:
    """Hold every row of ``session`` to ``ctx`` tokens (None: the artifact's context). Before
    the session's rows are started: its cache is allocated up to ``max_length`` at most."""
    if ctx is not None:
        session.max_length = checked(ctx, session.max_length)


def check_runs(runs: list[tuple[str, int]], session, given: bool) -> None:
    """Refuse, before any of them starts, a run (what it is, the tokens it holds) longer than the
    session's context; ``given``: the context came from -c/--ctx-size (else the artifact's)."""
    ctx = session.max_length
    for what, tokens in runs:
        if ctx is not None and tokens > ctx:
            raise ValueError(f"{what} needs {tokens} tokens; {'-c/--ctx-size' if given else 'this artifact'} "
                             f"holds {ctx}")
