"""runtime/loop_mailbox.py: a burst from another thread wakes the loop once, order kept."""
import asyncio
import threading

import pytest

from kiln.runtime.loop_mailbox import LoopMailbox, mailbox_for


def test_a_burst_is_one_wakeup_and_each_queue_keeps_its_order():
    async def main():
        loop = asyncio.get_running_loop()
        box = mailbox_for(loop)
        assert mailbox_for(loop) is box
        queues = [asyncio.Queue() for _ in range(3)]
        wakeups = []
        drain = box._drain
        box._drain = lambda: (wakeups.append(1), drain())

        def producer():                 # a decode step's events, posted from its thread
            for step in range(4):
                for q in queues:
                    box.put(q, step)
        t = threading.Thread(target=producer)
        t.start()
        t.join()
        got = [[await asyncio.wait_for(q.get(), 2) for _ in range(4)] for q in queues]
        assert got == [[0, 1, 2, 3]] * 3
        assert len(wakeups) == 1       # all twelve arrived before the loop ran: one drain
    asyncio.run(main())


def test_a_closed_loop_raises_and_forgets_the_item():
    loop = asyncio.new_event_loop()
    loop.close()
    box = LoopMailbox(loop)
    with pytest.raises(RuntimeError):
        box.put(asyncio.Queue(), 1)
    assert box._items == []


def test_settle_waits_for_the_loop_to_hand_out_the_burst():
    async def main():
        box = LoopMailbox(asyncio.get_running_loop())
        q = asyncio.Queue()
        assert box.settle(0)            # nothing posted: settled
        result = {}

        def producer():
            box.put(q, "token")
            result["settled"] = box.settle(2)       # the loop runs while this thread waits
            result["handed out"] = q.qsize()
        t = threading.Thread(target=producer)
        t.start()
        while t.is_alive():
            await asyncio.sleep(0.001)
        assert result == {"settled": True, "handed out": 1}
        assert q.get_nowait() == "token"
    asyncio.run(main())


def test_settle_all_drops_a_closed_loops_mailbox():
    """A server's loop that closed with an item still posted must not make every later step
    wait for it."""
    import time

    from kiln.runtime import loop_mailbox
    loop = asyncio.new_event_loop()
    box = mailbox_for(loop)
    box.put(asyncio.Queue(), "never drained")        # the loop never runs
    loop.close()
    began = time.perf_counter()
    loop_mailbox.settle_all(1.0)
    assert time.perf_counter() - began < 0.5
    assert all(b is not box for b in loop_mailbox._MAILBOXES.values())
