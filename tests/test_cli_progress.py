"""Progress as a person at a terminal sees it (a pty): counts against a total only where the
total is right, megabytes written, time left; and ``kiln bench`` saying what it times."""
import os
import pty
import re
import select
import subprocess
import sys

from conftest import HF_FIXTURES

LLAMA = HF_FIXTURES / "llama"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def in_a_terminal(*args) -> tuple[int, list[str]]:
    """Run kiln with a pty for stdin/stdout/stderr; the frames of its live display, as text."""
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "kiln.cli", *map(str, args)], stdin=slave, stdout=slave,
                         stderr=slave, close_fds=True,
                         env={**os.environ, "TERM": "xterm", "COLUMNS": "200", "KILN_DEBUG": ""})
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            try:
                data = os.read(master, 1 << 16)
            except OSError:             # the child closed its end
                break
            if not data:
                break
            chunks.append(data)
        elif p.poll() is not None:
            break
    p.wait(timeout=300)
    os.close(master)
    text = ANSI.sub("", b"".join(chunks).decode(errors="replace"))
    return p.returncode, [f.strip() for f in re.split(r"[\r\n]+", text) if f.strip()]


def counts(frames, unit):
    return [tuple(map(int, m.groups())) for f in frames for m in [re.search(rf"(\d+)/(\d+) {unit}", f)] if m]


def test_convert_counts_to_its_total_with_megabytes(tmp_path):
    rc, frames = in_a_terminal("convert", LLAMA, tmp_path / "m.gguf", "--quant", "q8_0")
    assert rc == 0, frames
    seen = counts(frames, "tensors")
    assert seen and all(done <= total == 21 for done, total in seen), seen
    assert any(re.search(r"\d+/21 tensors \d+\.\d MB", f) for f in frames), frames
    assert not any("None" in f for f in frames)


def test_onnx_export_counts_without_a_wrong_total(tmp_path):
    rc, frames = in_a_terminal("convert", LLAMA, tmp_path / "m", "--to", "onnx")
    assert rc == 0, frames
    assert not counts(frames, "tensors"), frames           # initializers are not the model's tensors
    assert any(re.search(r"\d+ tensors", f) for f in frames)


def test_compile_shows_no_none(tmp_path):
    rc, frames = in_a_terminal("compile", LLAMA, "-o", tmp_path / "m.kiln")
    assert rc == 0, frames
    assert not any("None" in f for f in frames), frames
    # the stage and the weights written so far (the writing itself may pass between two frames)
    assert any(re.search(r" [1-9]\d* weights", f) for f in frames), frames


def test_bench_says_what_it_times(tmp_path):
    art = tmp_path / "m.kiln"
    assert subprocess.run([sys.executable, "-m", "kiln.cli", "compile", LLAMA, "-o", art, "-q"]).returncode == 0
    r = subprocess.run([sys.executable, "-m", "kiln.cli", "bench", art, "--prefill-tokens", "16", "--decode-tokens",
                        "4", "--repeats", "1", "--context", "32", "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == [
        f"kiln bench: loading {art}",
        "kiln bench: timing prefill of 16 tokens (1 run after a warm-up)",
        "kiln bench: timing decode of 4 tokens after the 5-token prompt (1 run)",
        "kiln bench: timing decode of 4 tokens after 32 tokens of context (1 run)"]
