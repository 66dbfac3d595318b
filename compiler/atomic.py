"""Atomic outputs: whatever kiln writes appears at its destination complete, or not at all.

Every output (a GGUF or safetensors file, an HF / ONNX / artifact folder) is built under a
staging name beside its destination, fsynced, and renamed into place:

- a file: ``.NAME.kiln-PID-RAND.tmp``, then ``os.replace`` over ``NAME`` (atomic, old or new);
- a folder: ``.NAME.kiln-PID-RAND.partial``, then swapped with an existing ``NAME`` in one
  ``renameat2(RENAME_EXCHANGE)`` (Linux); where that is unavailable the old folder is renamed
  aside to ``.NAME.kiln-PID-RAND.old`` and the new one in. Either way the old folder ends up as
  ``.NAME.kiln-PID-RAND.trash`` and is deleted.

A writer holds an exclusive ``flock`` on its staging entry while it works. Each writer first
sweeps the destination's folder for staging entries that no one holds (their writer died:
SIGKILL, power loss): ``.tmp``/``.partial``/``.trash`` are deleted, and an ``.old`` whose
destination is missing is renamed back (a writer killed between the two renames of the
fallback swap), otherwise deleted. Sweeps, staging creation and swaps take an ``flock`` on the
destination's folder, so concurrent writers see each other's entries whole and two writes to
the same destination both complete; the one that renames last wins, as with ``mv``.

A folder output never deletes files it does not own. A writer names the files an output of
its kind writes (``owned``: glob patterns of relative paths); when a folder is replaced, every
other file of the old folder is hard-linked (or copied) into the new one before the swap, so
the user's README, templates or extra weights survive. Kinds that cannot hold other files
(artifacts: the manifest lists every file) refuse such a folder instead. Whether an existing
destination may be replaced at all is the caller's choice (``refuse_existing``: the CLI's
``--force``).

A write that fails for lack of space (ENOSPC, EFBIG, EDQUOT) or on a read-only or failing disk
becomes ``KilnError(destination, "cannot write: ...")`` and the staging entry is removed.

This module is imported by the runtime (through ``kiln.artifact``), so it stays light.
"""
from __future__ import annotations

import contextlib
import errno
import fnmatch
import os
import re
import secrets
import shutil
import signal
from pathlib import Path

from .errors import KilnError

try:
    import fcntl
except ImportError:                 # not POSIX: no locks, so only dead-for-sure entries are swept
    fcntl = None

_STAGED = re.compile(r"^\.(?P<dest>.+)\.kiln-(?P<pid>\d+)-[0-9a-f]{8}\.(?P<kind>tmp|partial|old|trash)$")
_WRITE_ERRORS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EIO}
_own_staging: set[str] = set()      # folders this process is staging: files inside are written in place


# ---- test hook ------------------------------------------------------------------------------

_events = 0


def kill_point(event: str) -> None:
    """TEST HOOK for the crash-safety tests (tests/test_crash_safety.py); a no-op otherwise.

    Writers call it after each step that changes the disk: a tensor written, a staging entry
    created, fsynced, swapped, cleaned. ``KILN_TEST_KILL_LOG=FILE`` appends ``N EVENT`` per
    call to FILE (to learn a run's events); ``KILN_TEST_KILL_AT=N`` makes the N-th call SIGKILL
    the process, as a crash or power cut would, with no cleanup of any kind.
    ``KILN_TEST_NO_EXCHANGE=1`` makes folder swaps take the two-rename fallback path.
    """
    at, log = os.environ.get("KILN_TEST_KILL_AT"), os.environ.get("KILN_TEST_KILL_LOG")
    if at is None and log is None:
        return
    global _events
    _events += 1
    if log:
        with open(log, "a") as f:
            f.write(f"{_events} {event}\n")
    if at is not None and _events == int(at):
        os.kill(os.getpid(), signal.SIGKILL)


# ---- locks and sweeping -----------------------------------------------------------------------

@contextlib.contextmanager
def _dir_lock(folder):
    """Exclusive flock on a folder: sweeps, staging creation and swaps in it are serialised."""
    fd = None
    if fcntl is not None:
        try:
            fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            if fd is not None:
                os.close(fd)
            fd = None           # cannot lock here (permissions, filesystem): work unlocked
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _hold(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _abandoned(path: str) -> bool:
    """True when no live writer holds the staging entry at ``path``."""
    if fcntl is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        # best effort, as a clean-up must be: on a read-only disk even a missing path is EROFS,
        # and a later sweep removes what stays
        with contextlib.suppress(OSError):
            os.unlink(path)


def _staging_name(folder: str, dest_name: str, kind: str) -> str:
    return os.path.join(folder, f".{dest_name}.kiln-{os.getpid()}-{secrets.token_hex(4)}.{kind}")


def _sweep_locked(folder: str) -> list[str]:
    """Under the folder's lock: restore or rename to trash what dead writers left; returns the
    trash to delete once the lock is released."""
    trash = []
    try:
        names = os.listdir(folder)
    except OSError:
        return trash
    for name in names:
        m = _STAGED.match(name)
        if m is None:
            continue
        path = os.path.join(folder, name)
        kind = m["kind"]
        if kind == "old":
            # only a writer killed between the two renames of a fallback swap leaves one
            dest = os.path.join(folder, m["dest"])
            if not os.path.lexists(dest):
                with contextlib.suppress(OSError):
                    os.rename(path, dest)
                continue                    # restored, or left for a later sweep: never deleted
        elif kind != "trash" and not _abandoned(path):
            continue
        trash.append(path)
    return trash


def sweep(folder) -> None:
    """Clean what killed kiln writers left in ``folder`` (see the module docstring)."""
    folder = os.fspath(folder)
    with _dir_lock(folder):
        trash = _sweep_locked(folder)
    for path in trash:
        _remove(path)


def _fsync_dir(folder: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(root: str) -> None:
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(dirpath)


def _write_error(dest, e: OSError) -> KilnError | None:
    if e.errno in _WRITE_ERRORS:
        return KilnError(dest, f"cannot write: {e.strerror or e}")
    return None


# ---- files ----------------------------------------------------------------------------------

@contextlib.contextmanager
def _removed_on_failure(tmp: str, dest):
    """On any failure inside, the staging entry ``tmp`` goes; a write error becomes the
    one-line KilnError for ``dest`` (disk full, read-only), anything else propagates."""
    try:
        yield
    except OSError as e:
        _remove(tmp)
        err = _write_error(dest, e)
        if err is None:
            raise
        raise err from None
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_file(dest):
    """Yield a binary file open for writing; on success it becomes ``dest`` atomically.

    On any error, or if the process dies, nothing appears at ``dest`` (a file already there
    is untouched). Inside a folder that this process is staging the file is written in place,
    since the folder is renamed into place whole.
    """
    dest = os.fspath(dest)
    folder = os.path.dirname(os.path.abspath(dest))
    if os.path.isdir(dest):
        raise KilnError(dest, "is a folder; give a file name (kiln does not replace a folder with a file)")
    if os.path.realpath(folder) in _own_staging:
        with open(dest, "wb") as f:
            yield f
        return
    sweep(folder)
    tmp = _staging_name(folder, os.path.basename(dest), "tmp")
    try:
        with _dir_lock(folder):
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)   # 0o666: honour the umask
            _hold(fd)
    except OSError as e:
        raise KilnError(dest, f"cannot write: {e.strerror or e}") from None
    kill_point("file.created")
    with _removed_on_failure(tmp, dest):
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
            kill_point("file.synced")
            with _dir_lock(folder):
                os.replace(tmp, dest)
            kill_point("file.replaced")
        _fsync_dir(folder)


# ---- folders --------------------------------------------------------------------------------

_RENAME_EXCHANGE = 2
_renameat2 = None


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the system cannot."""
    global _renameat2
    if os.environ.get("KILN_TEST_NO_EXCHANGE"):
        return False
    if _renameat2 is None:
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            fn = libc.renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            _renameat2 = (fn, ctypes)
        except (ImportError, OSError, AttributeError):
            _renameat2 = False
    if not _renameat2:
        return False
    fn, ctypes = _renameat2
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), b)


def refuse_existing(dest, force: bool) -> None:
    """Without ``force``, an existing destination (a file, or a folder with anything in it) is
    an error: kiln replaces nothing the user did not ask it to."""
    dest = Path(dest)
    if force or not os.path.lexists(dest):
        return
    if dest.is_dir() and not dest.is_symlink() and not any(dest.iterdir()):
        return
    if not dest.is_dir():
        raise KilnError(dest, "already exists; add --force to replace it, or choose another name")
    raise KilnError(dest, "already exists and is not empty; add --force to replace the files kiln writes "
                          "(it never deletes others), or choose another name")


def _matches(rel: str, owned) -> bool:
    return any(fnmatch.fnmatchcase(rel, pattern) for pattern in owned)


def _files_under(folder: str):
    """Relative POSIX paths of every non-folder entry under ``folder`` (symlinks not followed)."""
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            yield os.path.relpath(os.path.join(dirpath, name), folder).replace(os.sep, "/")


def foreign_files(dest, owned) -> list[str]:
    """Files in the folder ``dest`` that no output matching ``owned`` writes (sorted)."""
    dest = os.fspath(dest)
    if not os.path.isdir(dest) or os.path.islink(dest):
        return []
    return sorted(rel for rel in _files_under(dest) if not _matches(rel, owned))


def refuse_foreign(dest, owned, kind: str) -> None:
    """For outputs that may hold nothing else (an artifact): refuse a folder with other files."""
    foreign = foreign_files(dest, owned)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise KilnError(dest, f"holds files that are not part of {kind} ({shown}); kiln does not delete "
                              f"them and {kind} cannot hold them, so move them or choose another folder")


def _carry(old: str, new: str, owned) -> None:
    """Link every file of the folder ``old`` that is neither rewritten in ``new`` nor owned by
    this kind of output into ``new`` at the same place: replacing a folder keeps them."""
    for rel in foreign_files(old, owned):
        src, dst = os.path.join(old, rel), os.path.join(new, rel)
        if os.path.lexists(dst):
            continue
        try:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if os.path.islink(src):
                os.symlink(os.readlink(src), dst)
                continue
            try:
                os.link(src, dst)
            except OSError:                 # a filesystem without hard links
                shutil.copy2(src, dst)
        except OSError as e:
            raise KilnError(os.path.join(old, rel), f"cannot keep this file in the new output: "
                                                    f"{e.strerror or e}; nothing was replaced") from None
    for dirpath, dirnames, filenames in os.walk(old):
        if not dirnames and not filenames:          # an empty folder of the user's, kept as well
            with contextlib.suppress(OSError):
                os.makedirs(os.path.join(new, os.path.relpath(dirpath, old)), exist_ok=True)


@contextlib.contextmanager
def staging(dest, owned=(), keep_others: bool = True, kind: str = "this output"):
    """Yield a new folder beside ``dest``; on success it replaces ``dest`` atomically.

    On error the folder vanishes and ``dest`` (if any) is untouched; if the process dies, the
    next kiln write into the same folder clears what was left (see the module docstring).
    ``owned``: glob patterns (relative POSIX paths) of the files an output of this kind writes,
    or a function giving them for what is at ``dest`` now (an artifact's are its manifest's,
    which another writer may replace while this one works).
    Other files of an existing ``dest`` are kept: linked into the new folder before the swap,
    or, where ``keep_others`` is false (``kind`` cannot hold them), refused before any work.
    """
    owned_now = owned if callable(owned) else (lambda: owned)
    dest = Path(dest)
    parent = os.fspath(dest.parent) if str(dest.parent) else "."
    if os.path.lexists(dest) and not dest.is_dir():
        raise KilnError(dest, "exists and is not a folder; remove it or choose another name")
    if not keep_others:
        refuse_foreign(dest, owned_now(), kind)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise KilnError(dest, f"cannot write: {e.strerror or e}") from None
    sweep(parent)
    tmp = _staging_name(parent, dest.name, "partial")
    fd = None
    try:
        with _dir_lock(parent):
            os.mkdir(tmp, 0o777)            # an artifact is an ordinary folder: the umask decides
            fd = os.open(tmp, os.O_RDONLY)
            _hold(fd)
    except OSError as e:
        if fd is not None:
            os.close(fd)
        _remove(tmp)
        raise KilnError(dest, f"cannot write: {e.strerror or e}") from None
    _own_staging.add(os.path.realpath(tmp))
    kill_point("folder.created")
    trash = None
    with _removed_on_failure(tmp, dest):
        try:
            yield Path(tmp)
            if dest.is_dir():
                current = owned_now()                       # it may have changed meanwhile
                if not keep_others:
                    refuse_foreign(dest, current, kind)
                _carry(os.fspath(dest), tmp, current)
            _fsync_tree(tmp)
            kill_point("folder.synced")
            with _dir_lock(parent):
                trash = _swap_in(tmp, os.fspath(dest), parent)
            _fsync_dir(parent)
        finally:
            _own_staging.discard(os.path.realpath(tmp))
            os.close(fd)
    if trash:
        _remove(trash)
        kill_point("folder.cleaned")


def _swap_in(tmp: str, dest: str, parent: str) -> str | None:
    """Under the folder lock: make ``tmp`` the folder at ``dest``; returns the old one's trash name."""
    if not os.path.lexists(dest):
        os.rename(tmp, dest)
        kill_point("folder.renamed")
        return None
    if os.path.lexists(dest) and not os.path.isdir(dest):
        raise KilnError(dest, "exists and is not a folder; remove it or choose another name")
    trash = _staging_name(parent, os.path.basename(dest), "trash")
    if _exchange(tmp, dest):
        kill_point("folder.exchanged")
        os.rename(tmp, trash)               # tmp now holds the previous folder
    else:
        old = _staging_name(parent, os.path.basename(dest), "old")
        os.rename(dest, old)
        kill_point("folder.aside")          # the window a later sweep repairs: dest missing, .old beside
        os.rename(tmp, dest)
        kill_point("folder.renamed")
        os.rename(old, trash)
    kill_point("folder.trashed")
    return trash
