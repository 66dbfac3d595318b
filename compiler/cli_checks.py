"""The command line's checks and phrasing: what must be verified before a command starts its
work (a plot path, a port), a destination's format from its suffix, ``--help`` with defaults,
runtime advice rephrased as flags, and Ctrl-C as one line."""
from __future__ import annotations

import argparse
import errno
import os
import sys


def check_writable(path) -> None:
    """A one-line error now if ``path`` cannot be written later (no such folder, read-only)."""
    import tempfile

    from kiln.errors import KilnError
    if os.path.isdir(path):
        raise KilnError(path, "is a folder; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.kiln-probe-")
    except OSError as e:
        raise KilnError(path, f"cannot write: {e.strerror or e}") from None
    os.close(fd)
    os.unlink(probe)


def check_port(host: str, port: int) -> None:
    """A one-line error if the server could not listen at host:port (in use, not this host's)."""
    import socket

    from kiln.errors import KilnError
    where = f"{host}:{port}"
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.create_server((host, port), family=family):     # SO_REUSEADDR, as uvicorn
            pass
    except socket.gaierror as e:
        raise KilnError(where, f"cannot listen: unknown host ({e.strerror})") from None
    except OSError as e:
        hint = "; another server is using it: stop it or choose another --port" if e.errno == errno.EADDRINUSE else ""
        reason = os.strerror(e.errno) if e.errno else str(e)
        raise KilnError(where, f"cannot listen: {reason}{hint}") from None


# a destination's suffix that names its format; an HF folder has none, so it needs --to
SUFFIX_FORMATS = {".gguf": "gguf", ".safetensors": "safetensors", ".onnx": "onnx"}


def format_of(dst: str) -> str:
    """``convert``'s output format when --to is left out: DST's suffix, else a one-line error."""
    from kiln.errors import KilnError
    fmt = SUFFIX_FORMATS.get(os.path.splitext(dst.rstrip("/"))[1].lower())
    if fmt is None:
        raise KilnError(dst, "which format? add --to hf, gguf, safetensors or onnx (a name ending in "
                             ".gguf, .safetensors or .onnx says it without --to)")
    return fmt


class HelpFormatter(argparse.HelpFormatter):
    """``--help`` shows each option's default, unless there is none or its help says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or "default" in text or action.default is None
                or action.default is False or action.default is argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


# the runtime's advice names its Python arguments; at the command line the flags say it
CLI_ADVICE = [("pass chat_template= or format the prompt yourself",
               "leave out --chat and give the prompt already formatted"),
              ("(add_special_tokens=True prepends BOS)", "(give some text, or token ids with --ids)"),
              ("so it cannot encode a text prompt; pass token ids", "so it cannot encode a text prompt; "
               "give token ids with --ids")]


def as_cli_advice(message: str) -> str:
    """A runtime error message with its Python advice replaced by the flags that do the same."""
    for python, cli in CLI_ADVICE:
        message = message.replace(python, cli)
    return message


interrupted: list[int] = []             # SIGINTs this process received (see note_interrupts)
_own_process: list[bool] = []           # note_interrupts ran: the process is kiln's command


def note_interrupts() -> None:
    """Ctrl-C raises KeyboardInterrupt as usual, and is remembered: a native library that it
    interrupts (TVM turns it into an empty RuntimeError) must not make it an internal error."""
    import signal
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return                          # ignored (a background job) or someone else's: leave it

    def handler(signum, frame):
        interrupted.append(signum)
        signal.default_int_handler(signum, frame)
    signal.signal(signal.SIGINT, handler)
    _own_process.append(True)


def interrupt_exit() -> int:
    import signal
    # a library may re-raise the interrupt it caught; the one line below is the last word
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    print("kiln: interrupted", file=sys.stderr)
    if _own_process:
        # the work was unwound (staging removed) on the way here; what is left are native
        # libraries' destructors, which log from C++ at exit (TVM: "BlockBuilder destroyed with
        # remaining blocks!" when the interrupt landed in a lowering)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    return 130
