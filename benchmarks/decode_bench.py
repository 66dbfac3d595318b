#!/usr/bin/env python3
"""kiln's decode and prefill speed beside the peers, measured in the same run.

    python benchmarks/decode_bench.py ARTIFACT.kiln --gguf MODEL.gguf \
        [--peer-python PEER_VENV/bin/python] [--hf HF_DIR]
        [--oga-python OGA_VENV/bin/python --oga OGA_DIR] [--tokens 128]

Runs `kiln bench` on the artifact, then ../shared/bench/peers.py with the peer venv's python
(llama-cpp-python, onnxruntime-genai, transformers: whichever it has), and prints one table
with kiln's speed as a ratio of each peer's.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

PEERS = Path(__file__).resolve().parents[2] / "shared" / "bench" / "peers.py"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--gguf")
    ap.add_argument("--hf")
    ap.add_argument("--oga")
    ap.add_argument("--peer-python", help="python with llama-cpp-python and/or torch+transformers")
    ap.add_argument("--oga-python", help="python with onnxruntime-genai (often its own venv)")
    ap.add_argument("--tokens", type=int, default=128)
    a = ap.parse_args()
    out = subprocess.run([sys.executable, "-m", "kiln.cli", "bench", a.artifact, "--decode-tokens", str(a.tokens), "--json"],
                         capture_output=True, text=True, check=True).stdout
    kiln = json.loads(out.strip().splitlines()[-1])
    rows = [("kiln", kiln["prefill_tokens_per_s"], kiln["decode_tokens_per_s"])]
    jobs = []
    if a.peer_python:
        jobs.append((a.peer_python, {"gguf": a.gguf, "hf": a.hf}))
    if a.oga_python and a.oga:
        jobs.append((a.oga_python, {"oga": a.oga}))
    for python, paths in jobs:
        cmd = [python, str(PEERS), "--tokens", str(a.tokens)]
        for flag, path in paths.items():
            if path:
                cmd += [f"--{flag}", path]
        peers = subprocess.run(cmd, capture_output=True, text=True).stdout
        for line in peers.splitlines()[1:]:
            m = re.match(r"(.{20})\s*([\d.]+|-)\s+([\d.]+)", line)
            if m:
                rows.append((m.group(1).strip(), None if m.group(2) == "-" else float(m.group(2)), float(m.group(3))))
    print(f"{'engine':<22}{'prefill tok/s':>15}{'decode tok/s':>14}{'kiln decode ratio':>19}")
    for name, pf, dec in rows:
        ratio = kiln["decode_tokens_per_s"] / dec
        print(f"{name:<22}{(f'{pf:.1f}' if pf else '-'):>15}{dec:>14.1f}{ratio:>18.2f}x")


if __name__ == "__main__":
    main()
