"""The one error type kiln shows to users: a file and what is wrong with it."""
from __future__ import annotations

import os


class KilnError(Exception):
    """A problem with an input or an output that the user can act on.

    The CLI prints it as one line, ``kiln: PATH: MESSAGE``, and exits with code 2.
    """

    def __init__(self, path, message: str):
        self.path = os.fspath(path) if path is not None else None
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message
