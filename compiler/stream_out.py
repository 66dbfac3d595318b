"""A generation's pieces of text written as they come (``kiln run``, ``kiln chat``)."""
from __future__ import annotations


def write_stream(pieces, out, shown: list | None = None):
    """Write each piece of the ``pieces`` generator to ``out``, flushed so a terminal shows it
    at once (also appended to ``shown``); returns the generator's result."""
    while True:
        try:
            piece = next(pieces)
        except StopIteration as stop:
            return stop.value
        if shown is not None:
            shown.append(piece)
        out.write(piece)
        out.flush()
