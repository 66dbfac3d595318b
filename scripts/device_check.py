"""The checks of scripts/device_check.sh, on a machine with an NVIDIA GPU.

For SmolLM2 (the GGUF) and the llama and qwen2 fixtures, with the onnxrt and tvm backends:
compile for ``cuda`` (``--arch`` to pick the architecture), generate greedily, and compare
with the references (SmolLM2: tests/data/fixtures/smollm2/reference.json; fixtures: their
reference.npz). Then ``kiln bench`` figures for SmolLM2 on both backends. Exit status 1 on
any mismatch, 0 when everything matched.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "data" / "fixtures"


def greedy(session, prompt, n, banned=()):
    session.reset(1)
    logits = session.forward(np.asarray([prompt], dtype=np.int64), last_only=True)[0, -1]
    out = []
    for _ in range(n):
        logits = np.array(logits, dtype=np.float32)
        logits[list(banned)] = -np.inf
        out.append(int(np.argmax(logits)))
        logits = session.forward(np.array([[out[-1]]]), last_only=True)[0, -1]
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", help="sm80, sm86, sm89 or sm90 (default: the cuda preset's)")
    ap.add_argument("--out", default="/tmp/kiln-device-check")
    ap.add_argument("--target", default="cuda", help="cuda (default); cpu runs the same checks here, to try the script")
    a = ap.parse_args()
    from kiln import runtime
    from kiln.driver import compile as kiln_compile
    from kiln.frontends.known_models import resolve
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    reference = json.loads((FIXTURES / "smollm2" / "reference.json").read_text())
    models = {"smollm2": resolve("smollm2"), "llama": FIXTURES / "hf" / "llama", "qwen2": FIXTURES / "hf" / "qwen2"}
    failures, artifacts = [], {}
    for backend in ("onnxrt", "tvm"):
        for name, src in models.items():
            t = time.perf_counter()
            art = kiln_compile(src, target=a.target, arch=a.arch, backend=backend, output=out / f"{name}-{backend}.kiln",
                               force=True)          # the script's own outputs of an earlier run
            built = time.perf_counter() - t
            model = runtime.load(art)
            if name == "smollm2":
                artifacts[backend] = art
                cases = [(g["prompt_ids"], g["greedy_ids"], model.tokenizer.eos_ids) for g in reference["generations"]]
            else:
                ref = np.load(src / "reference.npz")
                cases = [(ref["prompt"][0].tolist(), ref["greedy"].tolist(), ())]
            for i, (prompt, want, banned) in enumerate(cases):
                got = greedy(model.session, prompt, len(want), banned)
                same = sum(1 for x, y in zip(got, want) if x == y)
                ok = got == want
                print(f"{'ok  ' if ok else 'FAIL'} {backend:<6} {name:<8} case {i}: {same}/{len(want)} tokens "
                      f"(compiled in {built:.1f} s)", flush=True)
                if not ok:
                    failures.append(f"{backend} {name} case {i}: got {got}, want {want}")
    for backend, art in artifacts.items():
        print(f"--- kiln bench, {backend}", flush=True)
        subprocess.run([sys.executable, "-m", "kiln.cli", "bench", str(art), "--repeats", "2"], check=False)
    for f in failures:
        print("mismatch:", f, file=sys.stderr)
    print("device_check:", "FAILED" if failures else "all greedy tokens match the references")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
