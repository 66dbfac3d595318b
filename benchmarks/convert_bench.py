#!/usr/bin/env python3
"""Conversion benchmark: kiln vs llama.cpp's convert_hf_to_gguf.py on the same HF folder.

    python benchmarks/convert_bench.py --hf SMOLLM2_BF16_DIR [--quant q8_0] \
        [--llama-python PEER_VENV/bin/python --converter .../convert_hf_to_gguf.py] [--repeats 2] \
        [--llama-quantize .../build/bin/llama-quantize]

llama.cpp's converter writes q8_0 (and the float types) itself; the K-quant mixtures
(q4_k_m, q6_k, ...) are made in two steps, convert_hf_to_gguf.py to bf16 then llama-quantize
(built from the llama.cpp sources, e.g. vendor/llama.cpp in the llama-cpp-python sdist):
with --llama-quantize the llama.cpp time is the sum of the two, and its peak RSS the larger.

Each converter runs in its own process; wall time and that process's peak RSS come from
os.wait4. When both ran, the two GGUF files are compared tensor by tensor (names, types,
shapes, bytes). Make the bf16 input with kiln itself:
    kiln convert smollm2 SMOLLM2_BF16_DIR --to hf --dtype bf16
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


# kiln's mixture names -> llama-quantize's (kiln's q2_k_m is llama.cpp's Q2_K mixture)
LLAMA_FTYPES = {"q2_k_m": "Q2_K"}


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of one command run as a child process."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    err = p.stderr.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{err[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def compare(a: Path, b: Path) -> dict:
    from kiln.frontends.gguf_file import read_gguf
    fa, fb = read_gguf(a), read_gguf(b)
    same, differ, only = [], [], sorted(set(fa.tensors) ^ set(fb.tensors))
    for name in fa.tensors.keys() & fb.tensors.keys():
        ta, tb = fa.tensors[name], fb.tensors[name]
        ok = ta.format is tb.format and ta.shape == tb.shape and ta.raw().tobytes() == tb.raw().tobytes()
        (same if ok else differ).append(f"{name} ({ta.format.name} vs {tb.format.name})")
    return {"identical": len(same), "different": sorted(differ), "only_in_one": only}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", required=True, help="HF folder to convert (e.g. SmolLM2 in bf16)")
    ap.add_argument("--quant", default="q8_0")
    ap.add_argument("--llama-python", help="python of a venv with llama.cpp's converter dependencies (torch, gguf)")
    ap.add_argument("--converter", help="path to llama.cpp's convert_hf_to_gguf.py")
    ap.add_argument("--llama-quantize", help="llama.cpp's llama-quantize binary: convert to bf16, then quantize")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both quantizers")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="kiln-convert-bench-"))
    rows = []
    kiln_out = out / "kiln.gguf"
    kiln_cmd = [sys.executable, "-m", "kiln.cli", "convert", a.hf, str(kiln_out), "--to", "gguf", "--quant", a.quant, "-q",
                "--force", "-t", str(a.threads)]    # every repeat replaces the previous run's file
    runs = [("kiln", [kiln_cmd], kiln_out)]
    if a.converter and a.llama_python:
        ref_out = out / "llama.cpp.gguf"
        if a.llama_quantize:
            mid = out / "llama.cpp-bf16.gguf"
            runs.append(("llama.cpp convert + llama-quantize",
                         [[a.llama_python, a.converter, a.hf, "--outtype", "bf16", "--outfile", str(mid)],
                          [a.llama_quantize, str(mid), str(ref_out), LLAMA_FTYPES.get(a.quant, a.quant.upper()),
                           str(a.threads)]], ref_out))
        else:
            runs.append(("llama.cpp convert_hf_to_gguf.py",
                         [[a.llama_python, a.converter, a.hf, "--outtype", a.quant, "--outfile", str(ref_out)]], ref_out))
    for name, cmds, _ in runs:
        for i in range(a.repeats):
            steps = [timed(cmd) for cmd in cmds]
            rows.append({"converter": name, "run": i + 1, "wall_s": round(sum(s[0] for s in steps), 2),
                         "steps_s": [round(s[0], 2) for s in steps], "peak_rss_mb": round(max(s[1] for s in steps))})
    print(f"{'converter':<34}{'run':>4}{'wall s':>9}{'peak RSS MB':>13}")
    for r in rows:
        print(f"{r['converter']:<34}{r['run']:>4}{r['wall_s']:>9.2f}{r['peak_rss_mb']:>13}")
    result = {"rows": rows, "quant": a.quant, "input": a.hf}
    if len(runs) == 2:
        best = {n: min((r for r in rows if r["converter"] == n), key=lambda r: r["wall_s"]) for n, _, _ in runs}
        k, l = best["kiln"], best[runs[1][0]]
        print(f"\nkiln / llama.cpp: wall {k['wall_s'] / l['wall_s']:.2f}x, peak RSS {k['peak_rss_mb'] / l['peak_rss_mb']:.2f}x")
        cmp = compare(kiln_out, runs[1][2])
        print(f"tensor data: {cmp['identical']} identical, {len(cmp['different'])} different, "
              f"{len(cmp['only_in_one'])} in one file only")
        for line in cmp["different"][:10] + cmp["only_in_one"][:10]:
            print("  ", line)
        result["comparison"] = cmp
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
