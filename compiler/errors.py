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


def load_json_object(path, *, unreadable: str, not_object: str, data: bytes | None = None,
                     error: type[KilnError] = KilnError) -> dict:
    """The JSON object in ``path`` (or in ``data``, its bytes already read), or one ``error``
    naming the file: ``unreadable`` (with the reason in brackets) for bytes that are not JSON
    Python can hold (not UTF-8, malformed, nested past the recursion limit, a number past the
    digit limit), ``not_object`` for valid JSON that is not an object."""
    import json
    try:
        if data is None:
            with open(path, "rb") as f:
                data = f.read()
        value = json.loads(data.decode("utf-8"))
    except OSError as e:
        raise error(path, f"{unreadable} ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise error(path, f"{unreadable} (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise error(path, f"{unreadable} ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise error(path, f"{unreadable} (nested too deeply)") from None
    except ValueError as e:      # a number past Python's digit limit
        raise error(path, f"{unreadable} ({str(e).split(';')[0].splitlines()[0][:200]})") from None
    if not isinstance(value, dict):
        raise error(path, not_object)
    return value
