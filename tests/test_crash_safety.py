"""Crash safety of every writer: killed at any step, out of space, or racing another run.

A conversion or compilation killed (SIGKILL, no cleanup) at a chosen step must leave at its
destination nothing, the previous complete output, or the new complete output — never a
part — and the next run must succeed and leave nothing but its output in the folder (it
sweeps what the killed run left, see ``kiln.atomic``). Steps are chosen deterministically with
the test hook ``kiln.atomic.kill_point``: a run with ``KILN_TEST_KILL_LOG`` lists its events
(tensors written, staging created, fsynced, swapped, cleaned), then ``KILN_TEST_KILL_AT=N``
kills the N-th. A write that runs out of space (``RLIMIT_FSIZE`` in the child, SIGXFSZ
ignored, so writes fail with EFBIG) ends in one ``kiln: DEST: cannot write: ...`` line, exit 2,
and nothing on disk. Two runs writing the same destination at once both succeed and leave one
complete output: the last to rename wins.
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HF_FIXTURES

LLAMA = HF_FIXTURES / "llama"          # sharded (4 shards), 21 tensors
MISTRAL = HF_FIXTURES / "mistral"      # the "previous output" of compiles, told apart by architecture
TIMEOUT = 120


def kiln(args, *, env=None, preexec_fn=None, cwd=None) -> subprocess.CompletedProcess:
    e = {**os.environ, "KILN_DEBUG": "", "PYTHONDONTWRITEBYTECODE": "1", **(env or {})}
    for k in ("KILN_TEST_KILL_AT", "KILN_TEST_KILL_LOG", "KILN_TEST_NO_EXCHANGE"):
        if env is None or k not in env:
            e.pop(k, None)
    return subprocess.run([sys.executable, "-m", "kiln.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=TIMEOUT, env=e, preexec_fn=preexec_fn, cwd=cwd)


# ---- the scenarios ----------------------------------------------------------------------------

def _convert(to, *extra):
    # --force: most runs replace an earlier output
    return lambda src, dest: ["convert", src, dest, "--to", to, "-q", "--force", *extra]


SCENARIOS = {
    # name: (argv(src, dest), destination name, previous-output argv (same dest, other content))
    "gguf": (_convert("gguf"), "out.gguf", lambda dest: _convert("gguf", "--dtype", "f16")(LLAMA, dest)),
    "hf": (_convert("hf"), "out-hf", lambda dest: _convert("hf", "--dtype", "bf16")(LLAMA, dest)),
    "hf-sharded": (_convert("hf", "--max-shard-size", "100KB"), "out-hf",
                   lambda dest: _convert("hf", "--dtype", "f16", "--max-shard-size", "50KB")(LLAMA, dest)),
    # ONNX Runtime named: the staging and renaming are the same for both backends, and its
    # one-second builds keep the dozens of killed compiles fast (TVM's export: "compile-tvm" below)
    "compile": (lambda src, dest: ["compile", src, "--backend", "onnxrt", "-o", dest, "-q", "--force"], "out.kiln",
                lambda dest: ["compile", MISTRAL, "--backend", "onnxrt", "-o", dest, "-q", "--force"]),
}


def snapshot(path: Path) -> dict[str, str] | None:
    """What is at ``path``: None, or {relative file: sha256} (a file is {"": sha256})."""
    if not os.path.lexists(path):
        return None
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def complete(scenario: str, path: Path, reference: dict) -> str | None:
    """Which complete output ``path`` holds: "new", "old", or None for something else."""
    if scenario == "compile":
        from kiln.artifact import ArtifactError, read_manifest
        try:
            m = read_manifest(path, check_hashes=True)
        except ArtifactError:
            return None
        return {"llama": "new", "mistral": "old"}.get(m["architecture"])
    snap = snapshot(path)
    return next((k for k, v in reference.items() if v == snap), None)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Per scenario: the complete new and old outputs, and the events of an uninterrupted run
    into an empty folder ("fresh") and over a previous output ("replace")."""
    root = tmp_path_factory.mktemp("refs")
    out = {}
    for name, (argv, dest_name, previous) in SCENARIOS.items():
        d = root / name
        (d / "old").mkdir(parents=True)
        (d / "new").mkdir()
        assert kiln(previous(d / "old" / dest_name)).returncode == 0
        events = {}
        for run in ("fresh", "replace"):
            log = root / f"{name}.{run}.events"
            r = kiln(argv(LLAMA, d / "new" / dest_name), env={"KILN_TEST_KILL_LOG": str(log)})
            assert r.returncode == 0, r.stderr
            events[run] = [line.split()[1] for line in log.read_text().splitlines()]
        out[name] = {"new": snapshot(d / "new" / dest_name), "old": snapshot(d / "old" / dest_name),
                     "old_path": d / "old" / dest_name, "events": events}
    return out


def _pick(events: list[str], which: str) -> int:
    """1-based index of an event: a name (its first occurrence), or tensor:first/middle/last."""
    if which.startswith("tensor:"):
        idx = [i for i, e in enumerate(events) if e in ("tensor", "weight")]
        return 1 + {"first": idx[0], "middle": idx[len(idx) // 2], "last": idx[-1]}[which.split(":")[1]]
    return 1 + events.index(which)


FILE_STEPS = ["file.created", "tensor:first", "tensor:middle", "tensor:last", "file.synced", "file.replaced"]
FOLDER_STEPS = ["folder.created", "tensor:first", "tensor:middle", "tensor:last", "folder.synced",
                "folder.exchanged", "folder.trashed"]
# the steps when no previous output exists: staging ends in a plain rename
FOLDER_STEPS_FRESH = ["folder.created", "tensor:middle", "folder.synced", "folder.renamed"]
KILLS = ([("gguf", s, True) for s in FILE_STEPS] + [("gguf", s, False) for s in ("tensor:middle", "file.synced")]
         + [(sc, s, True) for sc in ("hf", "hf-sharded", "compile") for s in FOLDER_STEPS]
         + [(sc, s, False) for sc in ("hf", "hf-sharded", "compile") for s in FOLDER_STEPS_FRESH])


def test_enough_kill_points():
    assert len(KILLS) >= 20
    assert {sc for sc, _, _ in KILLS} == set(SCENARIOS)


@pytest.mark.parametrize("scenario,step,previous", KILLS,
                         ids=[f"{sc}-{s}-{'replace' if p else 'fresh'}" for sc, s, p in KILLS])
def test_killed_writer_leaves_old_or_new(tmp_path, references, scenario, step, previous):
    argv, dest_name, _ = SCENARIOS[scenario]
    ref = references[scenario]
    out = tmp_path / "out"
    out.mkdir()
    dest = out / dest_name
    if previous:
        (shutil.copytree if ref["old_path"].is_dir() else shutil.copyfile)(ref["old_path"], dest)
    events = ref["events"]["replace" if previous else "fresh"]
    n = _pick(events, step)
    swap = "file.replaced" if scenario == "gguf" else "folder.exchanged" if previous else "folder.renamed"

    r = kiln(argv(LLAMA, dest), env={"KILN_TEST_KILL_AT": str(n)})
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)
    state = complete(scenario, dest, {"new": ref["new"], "old": ref["old"]}) if os.path.lexists(dest) else "nothing"
    # before the swap the destination is untouched; from the swap on it holds the new output
    expected = "new" if n >= _pick(events, swap) else "old" if previous else "nothing"
    assert state == expected, f"killed at {step} (event {n} of {len(events)}): destination holds {state}"

    r = kiln(argv(LLAMA, dest))
    assert r.returncode == 0, r.stderr
    assert complete(scenario, dest, {"new": ref["new"], "old": ref["old"]}) == "new"
    assert os.listdir(out) == [dest_name], os.listdir(out)


# ---- the two-rename fallback (no renameat2 RENAME_EXCHANGE) -----------------------------------

@pytest.mark.parametrize("step", ["folder.aside", "folder.renamed"])
def test_fallback_swap_killed_is_repaired(tmp_path, references, step):
    """Killed between the two renames, the previous artifact sits aside under a staging name:
    the next kiln write into the folder, whatever its destination, puts it back."""
    argv, dest_name, _ = SCENARIOS["compile"]
    ref = references["compile"]
    out = tmp_path / "out"
    out.mkdir()
    dest = out / dest_name
    shutil.copytree(ref["old_path"], dest)
    log = tmp_path / "events"
    env = {"KILN_TEST_NO_EXCHANGE": "1"}
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    shutil.copytree(ref["old_path"], scratch / dest_name)
    assert kiln(argv(LLAMA, scratch / dest_name), env={**env, "KILN_TEST_KILL_LOG": str(log)}).returncode == 0
    events = [line.split()[1] for line in log.read_text().splitlines()]
    assert "folder.exchanged" not in events and "folder.aside" in events

    r = kiln(argv(LLAMA, dest), env={**env, "KILN_TEST_KILL_AT": str(events.index(step) + 1)})
    assert r.returncode == -signal.SIGKILL
    leftovers = sorted(os.listdir(out))
    if step == "folder.aside":
        assert dest_name not in leftovers and any(n.endswith(".old") for n in leftovers), leftovers
    else:
        assert complete("compile", dest, {}) == "new"

    # an unrelated write into the same folder repairs it
    assert kiln(_convert("gguf")(LLAMA, out / "other.gguf")).returncode == 0
    assert sorted(os.listdir(out)) == sorted([dest_name, "other.gguf"]), os.listdir(out)
    assert complete("compile", dest, {}) == ("old" if step == "folder.aside" else "new")


# ---- a real model, once -----------------------------------------------------------------------

def test_killed_gguf_copy_of_smollm2(tmp_path, smollm2_gguf):
    """SmolLM2 GGUF -> GGUF (blocks kept) killed mid-way: the previous file is intact."""
    dest = tmp_path / "out" / "smollm2.gguf"
    dest.parent.mkdir()
    dest.write_bytes(b"previous complete output")
    log = tmp_path / "events"
    r = kiln(_convert("gguf")(smollm2_gguf, tmp_path / "scratch.gguf"), env={"KILN_TEST_KILL_LOG": str(log)})
    assert r.returncode == 0, r.stderr
    events = log.read_text().splitlines()
    assert len(events) > 100
    r = kiln(_convert("gguf")(smollm2_gguf, dest), env={"KILN_TEST_KILL_AT": str(len(events) // 2)})
    assert r.returncode == -signal.SIGKILL
    assert dest.read_bytes() == b"previous complete output"
    assert kiln(_convert("gguf")(smollm2_gguf, dest)).returncode == 0
    assert dest.read_bytes() == (tmp_path / "scratch.gguf").read_bytes()
    assert os.listdir(dest.parent) == ["smollm2.gguf"]


# ---- out of space -----------------------------------------------------------------------------

def _file_size_limit(limit: int):
    def pre():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)       # writes then fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


WRITERS = {
    "gguf": (_convert("gguf"), "out.gguf"),
    "hf": (_convert("hf"), "out-hf"),
    "hf-sharded": (_convert("hf", "--max-shard-size", "100KB"), "out-hf"),
    "safetensors": (_convert("safetensors"), "out.safetensors"),
    "onnx": (_convert("onnx"), "out-onnx"),
    "compile": (lambda src, dest: ["compile", src, "--backend", "onnxrt", "-o", dest, "-q", "--force"], "out.kiln"),
    # LLVM ends the process when it cannot write the library: the export runs in a child
    "compile-tvm": (lambda src, dest: ["compile", src, "--backend", "tvm", "-o", dest, "-q", "--force"], "out.kiln"),
}
# 0: the first byte fails; 600: small JSON files fit (config.json is 557 bytes), tensor data not
LIMITS = [0, 600, 60_000]


@pytest.mark.parametrize("limit", LIMITS)
@pytest.mark.parametrize("writer", list(WRITERS))
def test_disk_full(tmp_path, writer, limit):
    argv, dest_name = WRITERS[writer]
    out = tmp_path / "out"
    out.mkdir()
    dest = out / dest_name
    r = kiln(argv(LLAMA, dest), preexec_fn=_file_size_limit(limit))
    assert r.returncode == 2, r.stderr
    assert r.stderr == f"kiln: {dest}: cannot write: File too large\n", r.stderr
    assert os.listdir(out) == []


@pytest.mark.parametrize("writer", ["gguf", "hf-sharded", "compile"])
def test_disk_full_keeps_the_previous_output(tmp_path, writer):
    argv, dest_name = WRITERS[writer]
    out = tmp_path / "out"
    out.mkdir()
    dest = out / dest_name
    assert kiln(argv(LLAMA, dest)).returncode == 0
    before = snapshot(dest)
    r = kiln(argv(LLAMA, dest), preexec_fn=_file_size_limit(600))
    assert r.returncode == 2 and "cannot write: File too large" in r.stderr, r.stderr
    assert snapshot(dest) == before
    assert os.listdir(out) == [dest_name]


# ---- concurrent runs --------------------------------------------------------------------------

@pytest.mark.parametrize("previous", [False, True], ids=["fresh", "replace"])
@pytest.mark.parametrize("writer", ["compile", "gguf", "hf-sharded"])
def test_concurrent_writers_both_succeed(tmp_path, writer, previous):
    """Two runs to the same destination at once: both exit 0, one complete output remains."""
    argv, dest_name = WRITERS[writer]
    out = tmp_path / "out"
    out.mkdir()
    dest = out / dest_name
    srcs = [LLAMA, MISTRAL]
    if previous:
        assert kiln(argv(LLAMA, dest)).returncode == 0
    env = {**os.environ, "KILN_DEBUG": "", "PYTHONDONTWRITEBYTECODE": "1"}
    for _ in range(2):
        procs = [subprocess.Popen([sys.executable, "-m", "kiln.cli", *map(str, argv(src, dest))],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for src in srcs]
        results = [(p.communicate(timeout=TIMEOUT)[1], p.returncode)[::-1] for p in procs]
        assert [rc for rc, _ in results] == [0, 0], results
        assert os.listdir(out) == [dest_name], os.listdir(out)
        if writer == "compile":
            from kiln.artifact import read_manifest
            assert read_manifest(dest, check_hashes=True)["architecture"] in ("llama", "mistral")
        else:
            # one of the two complete outputs, whichever renamed last
            assert kiln(["inspect", dest]).returncode == 0


# ---- sweeping respects live writers ------------------------------------------------------------

def test_sweep_leaves_a_live_staging_folder_alone(tmp_path):
    from kiln.atomic import staging
    out = tmp_path / "out"
    out.mkdir()
    with staging(out / "mine.kiln") as st:
        (st / "part").write_text("in progress")
        assert kiln(_convert("gguf")(LLAMA, out / "other.gguf")).returncode == 0    # sweeps `out`
        assert (st / "part").read_text() == "in progress"
    assert (out / "mine.kiln" / "part").is_file()
    assert sorted(os.listdir(out)) == ["mine.kiln", "other.gguf"]


def test_folder_writer_refuses_to_replace_a_file(tmp_path):
    dest = tmp_path / "out-hf"
    dest.write_text("not a folder")
    r = kiln(_convert("hf")(LLAMA, dest))
    assert r.returncode == 2 and r.stderr == f"kiln: {dest}: exists and is not a folder; remove it or choose another name\n"
    assert dest.read_text() == "not a folder" and os.listdir(tmp_path) == ["out-hf"]


def test_tokenizer_json_written_as_the_library_saves_it(tmp_path):
    """TokenizerSpec.save writes tokenizer.json itself (so a full disk is an OSError): same bytes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.save(str(tmp_path / "lib.json"))
    assert json.loads((tmp_path / "lib.json").read_text()) == json.loads(tok.to_str(pretty=True))
    assert (tmp_path / "lib.json").read_text() == tok.to_str(pretty=True)
