"""Items from the scheduler's thread to asyncio queues, one event-loop wakeup per burst.

A decode step of eight streams yields eight events at once. ``loop.call_soon_threadsafe`` per
event wakes the loop (a write to its self-pipe) eight times, each wakeup a round of the loop
that competes for a core with the model's threads, which on a small machine are the ones
doing the work. The mailbox collects a burst and wakes the loop once; each queue still gets
its items in the order they were posted.
"""
from __future__ import annotations

import threading


class LoopMailbox:
    def __init__(self, loop):
        self.loop = loop
        self._items: list = []
        self._lock = threading.Lock()

    def put(self, queue, item) -> None:
        """From any thread: ``queue.put_nowait(item)`` soon, on the loop. Raises RuntimeError
        when the loop is closed, as ``call_soon_threadsafe`` does."""
        with self._lock:
            first = not self._items
            self._items.append((queue, item))
        if first:
            try:
                self.loop.call_soon_threadsafe(self._drain)
            except RuntimeError:
                with self._lock:
                    self._items.clear()
                raise

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for queue, item in items:
            queue.put_nowait(item)


_MAILBOXES: dict = {}
_GUARD = threading.Lock()


def mailbox_for(loop) -> LoopMailbox:
    """The loop's mailbox (one per loop; a server has one)."""
    with _GUARD:
        box = _MAILBOXES.get(id(loop))
        if box is None or box.loop is not loop:
            box = _MAILBOXES[id(loop)] = LoopMailbox(loop)
        return box
