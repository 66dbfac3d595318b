"""Items from the scheduler's thread to asyncio queues, one event-loop wakeup per burst.

A decode step of eight streams yields eight events at once. ``loop.call_soon_threadsafe`` per
event wakes the loop (a write to its self-pipe) eight times, each wakeup a round of the loop
that competes for a core with the model's threads, which on a small machine are the ones
doing the work. The mailbox collects a burst and wakes the loop once; each queue still gets
its items in the order they were posted.

``settle`` lets the scheduler's thread wait, between two decode steps, until the loop has
handed a burst to its streams (which then write their chunks in the same round of the loop),
so that work runs while the model's threads are idle rather than beside them: TVM releases
the GIL during a step, and on 2 cores a third busy thread stalls its parallel loops.
"""
from __future__ import annotations

import threading


class LoopMailbox:
    def __init__(self, loop):
        self.loop = loop
        self._items: list = []
        self._lock = threading.Lock()
        self._settled = threading.Event()
        self._settled.set()

    def put(self, queue, item) -> None:
        """From any thread: ``queue.put_nowait(item)`` soon, on the loop. Raises RuntimeError
        when the loop is closed, as ``call_soon_threadsafe`` does."""
        with self._lock:
            first = not self._items
            self._items.append((queue, item))
            self._settled.clear()
        if first:
            try:
                self.loop.call_soon_threadsafe(self._drain)
            except RuntimeError:
                with self._lock:
                    self._items.clear()
                    self._settled.set()
                raise

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for queue, item in items:
            queue.put_nowait(item)
        # after the callbacks the puts just scheduled: the streams have taken their items
        self.loop.call_soon(self._settle)

    def _settle(self) -> None:
        with self._lock:
            if not self._items:
                self._settled.set()

    def settle(self, timeout: float) -> bool:
        """Wait (at most ``timeout`` seconds) until the loop has handed out every item put so
        far; whether it had."""
        return self._settled.wait(timeout)


_MAILBOXES: dict = {}
_GUARD = threading.Lock()


def mailbox_for(loop) -> LoopMailbox:
    """The loop's mailbox (one per loop; a server has one)."""
    with _GUARD:
        box = _MAILBOXES.get(id(loop))
        if box is None or box.loop is not loop:
            box = _MAILBOXES[id(loop)] = LoopMailbox(loop)
        return box


def settle_all(timeout: float) -> None:
    """``settle`` every open loop's mailbox, each waiting at most ``timeout`` seconds. A closed
    loop's mailbox is dropped: nothing will drain it, and waiting on it would cost every step."""
    with _GUARD:
        for key in [k for k, box in _MAILBOXES.items() if box.loop.is_closed()]:
            del _MAILBOXES[key]
        boxes = list(_MAILBOXES.values())
    for box in boxes:
        box.settle(timeout)
