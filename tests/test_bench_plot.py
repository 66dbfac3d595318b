"""kiln bench --plot (compiler/benchplot.py): a PNG of decode tokens/s against context length,
kiln beside the peers of decode_bench.py JSON files; drawn from fixed figures, and once from
a real (tiny) bench run through the CLI."""
import json
import struct
import subprocess
import sys

import pytest

from kiln.benchplot import DPI, FIGSIZE, plot_decode, read_peer_runs  # noqa: E402
from kiln.errors import KilnError  # noqa: E402

SIZE = (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR" and data.rstrip(b"\x00")[-8:-4] == b"IEND"
    return struct.unpack(">II", data[16:24])


def bench_json(path, context, rows):
    path.write_text(json.dumps({"threads": 2, "repeats": 3, "tokens": 128, "context": context, "prefill_tokens": 130,
                                "rows": [{"engine": e, "decode_tokens_per_s": v} for e, v in rows.items()],
                                "skipped": {}}))
    return path


def test_plot_of_fixed_figures_is_a_png_of_the_expected_size(tmp_path):
    files = [bench_json(tmp_path / f"{c}.json", c, {"kiln": k, "llama.cpp": l, "kiln fast.kiln": f})
             for c, k, l, f in [(16, 140.0, 150.0, 170.0), (512, 120.0, 135.0, 150.0), (1000, 98.0, 120.0, 130.0)]]
    peers = read_peer_runs(files)
    assert peers == {"kiln (decode_bench.py)": {16: 140.0, 512: 120.0, 1000: 98.0},
                     "llama.cpp": {16: 150.0, 512: 135.0, 1000: 120.0},
                     "kiln fast.kiln (decode_bench.py)": {16: 170.0, 512: 150.0, 1000: 130.0}}
    out = plot_decode(tmp_path / "bench.png", {6: 160.0, 16: 150.0, 128: 141.0, 512: 118.0, 1000: 97.0}, peers,
                      note="test machine; fixed figures")
    assert png_size(out) == SIZE
    alone = plot_decode(tmp_path / "alone.png", {16: 150.0})
    assert png_size(alone) == SIZE
    # the lines are drawn: a picture with peers differs from one without
    assert out.read_bytes() != plot_decode(tmp_path / "kiln.png", {6: 160.0, 16: 150.0, 128: 141.0, 512: 118.0,
                                                                   1000: 97.0}, note="test machine; fixed figures"
                                           ).read_bytes()


def test_bad_peer_files_are_one_line_errors(tmp_path):
    with pytest.raises(KilnError, match="--context N"):
        read_peer_runs([bench_json(tmp_path / "a.json", 0, {"kiln": 1.0})])
    with pytest.raises(KilnError, match="decode_tokens_per_s"):
        read_peer_runs([bench_json(tmp_path / "b.json", 16, {"kiln": -1.0})])
    (tmp_path / "c.json").write_text("[1, 2]")
    with pytest.raises(KilnError, match="c.json"):
        read_peer_runs([tmp_path / "c.json"])
    with pytest.raises(KilnError, match="nothing to plot"):
        plot_decode(tmp_path / "x.png", {})


def test_kiln_bench_plot_from_the_cli(tmp_path, compiled_family):
    art = compiled_family("llama")
    peer = bench_json(tmp_path / "peer.json", 8, {"llama.cpp": 1234.0})
    cmd = [sys.executable, "-m", "kiln.cli", "bench", str(art), "--context", "4,8", "--decode-tokens", "3",
           "--repeats", "1", "--prefill-tokens", "8", "--threads", "1", "--json", "--plot", str(tmp_path / "b.png"),
           "--peers-json", str(peer)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert set(json.loads(r.stdout.strip().splitlines()[-1])["decode_tokens_per_s_at_context"]) == {"4", "8"}
    assert png_size(tmp_path / "b.png") == SIZE
    bad = subprocess.run(cmd[:-4] + ["--peers-json", str(peer)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--plot" in bad.stderr and "Traceback" not in bad.stderr
