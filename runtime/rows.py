"""The checks and arithmetic of per-row cache bookkeeping (:class:`kiln.runtime.session.RowCache`
holds the state): prompts of different lengths as one right-padded batch, a row joining a
running batch, cache growth, a reordering of rows."""
from __future__ import annotations

import numpy as np


def right_padded(prompts: list[list[int]], batch: int, cached: int, last_only: bool):
    """(ids [batch, longest], lengths [batch], logits positions) for prefilling every row of
    a fresh cache with its own prompt in one run; rows past their prompt hold padding."""
    if len(prompts) != batch or cached:
        raise ValueError(f"prefill takes {batch} prompts on a fresh cache (reset first)")
    lengths = np.array([len(p) for p in prompts], dtype=np.int64)
    if lengths.min() < 1:
        raise ValueError("a prompt has no tokens; the model needs at least one")
    ids = np.zeros((batch, int(lengths.max())), dtype=np.int64)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = p
    positions = (lengths - 1)[:, None] if last_only else np.tile(np.arange(ids.shape[1]), (batch, 1))
    return ids, lengths, positions


def check_join(row: int, prompt_tokens: int, batch: int, max_length: int | None) -> None:
    """The errors of a row that cannot join: an empty or too long prompt, a row out of range."""
    if prompt_tokens < 1:
        raise ValueError("a prompt has no tokens; the model needs at least one")
    if max_length is not None and prompt_tokens > max_length:
        raise ValueError(f"the prompt has {prompt_tokens} tokens but this artifact holds at most {max_length}")
    if not 0 <= row < batch:
        raise ValueError(f"row {row} is not in a batch of {batch}")


def check_extend(row: int, cached: int, new_tokens: int, batch: int, max_length: int | None) -> None:
    """The errors of tokens that cannot be appended to a row: none, too many, a bad row."""
    if new_tokens < 1:
        raise ValueError("no tokens to append to the row")
    if not 0 <= row < batch:
        raise ValueError(f"row {row} is not in a batch of {batch}")
    if max_length is not None and cached + new_tokens > max_length:
        raise ValueError(f"row {row} would hold {cached + new_tokens} tokens but this artifact holds "
                         f"at most {max_length}")


def doubled_capacity(capacity: int, needed: int, max_length: int | None) -> int:
    """The next capacity, doubling from ``capacity`` until ``needed`` fits (amortised growth),
    never past ``max_length``."""
    capacity = max(capacity, 1)
    while capacity < needed:
        capacity *= 2
    return min(capacity, max_length) if max_length is not None else capacity


def row_order(index, batch: int) -> np.ndarray | None:
    """``reorder_rows``'s argument checked: int64 [batch] of rows below ``batch``, or None
    when it leaves every row where it is."""
    index = np.asarray(index, dtype=np.int64)
    if index.shape != (batch,) or (index.size and not 0 <= index.min() <= index.max() < batch):
        raise ValueError(f"reorder_rows takes {batch} row numbers below {batch}, got {index.tolist()}")
    return None if np.array_equal(index, np.arange(batch)) else index
