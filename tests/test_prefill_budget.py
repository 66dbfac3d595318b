"""runtime/prefill_budget.py: chunk sizes follow the measured time towards the target, within
their bounds, and only while other rows wait."""
import pytest

from kiln.runtime.prefill_budget import ALIGN, FIRST_TOKENS, MIN_TOKENS, ChunkSizer


def test_alone_a_prompt_takes_the_whole_chunk():
    c = ChunkSizer(256, 0.5)
    assert c.budget(others_running=False) == 256
    assert c.budget(others_running=True) == FIRST_TOKENS


def test_chunks_shrink_as_each_costs_more_and_grow_back_at_most_doubling():
    c = ChunkSizer(256, 0.5)
    c.measured(64, 0.1)                  # 0.5 s would hold 320: capped by doubling
    assert c.budget(True) == 128
    c.measured(128, 0.2)
    assert c.budget(True) == 256         # the most
    c.measured(256, 2.0)                 # deep in a prompt: 64 tokens take 0.5 s
    assert c.budget(True) == 64
    c.measured(64, 3.0)
    assert c.budget(True) == MIN_TOKENS  # never below, so the prompt still moves
    c.measured(16, 0.1)
    assert c.budget(True) == 32 and 32 % ALIGN == 0


def test_no_target_means_fixed_chunks():
    c = ChunkSizer(256, None)
    c.measured(256, 10.0)
    assert c.budget(True) == 256
    assert ChunkSizer(None, 0.5).budget(True) is None
    assert ChunkSizer(8, 0.5).budget(True) == 8      # a chunk smaller than the first size
    with pytest.raises(ValueError):
        ChunkSizer(256, 0)
