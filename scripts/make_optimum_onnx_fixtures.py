"""Regenerate tests/data/onnx_optimum/: decoder exports made by optimum itself, for the ONNX
frontend's tests (tests/test_onnx_io.py).

Needs optimum, torch and transformers, which the kiln venv deliberately does not have. Use a
separate venv outside the repository (torch 2.13.0 CPU installs from this machine's disk):

    python3 -m venv /work/peers/optimum
    /work/peers/optimum/bin/pip install 'optimum[onnxruntime]' torch==2.13.0
    /work/peers/optimum/bin/python scripts/make_optimum_onnx_fixtures.py

Each export is what ``optimum-cli export onnx --model FIXTURE --task TASK OUT`` writes
(model.onnx with its weights inline, config.json, generation_config.json) for one of the
shared fixture families in tests/data/fixtures/hf/, so the family's ``reference.npz``
(transformers' own logits and greedy tokens) is the reference for the export too. The set
covers what differs between exports: with and without past KV, a norm weight the exporter
folds into a constant (gemma's ``1 + weight``), GPT-2's Conv1D weights and biases, phi3's
fused q/k/v and gate/up projections. ``index.json`` records the versions and the tasks.
"""
from __future__ import annotations

import json
import shutil
import sys
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "tests" / "data" / "fixtures" / "hf"
OUT = REPO / "tests" / "data" / "onnx_optimum"

# folder name -> (fixture family, optimum task)
EXPORTS = {
    "llama": ("llama", "text-generation-with-past"),
    "llama-no-past": ("llama", "text-generation"),
    "gemma": ("gemma", "text-generation-with-past"),
    "gpt2": ("gpt2", "text-generation-with-past"),
    "phi3": ("phi3", "text-generation-with-past"),
}
KEEP = ("model.onnx", "config.json", "generation_config.json")


def main() -> int:
    from optimum.exporters.onnx import main_export
    OUT.mkdir(parents=True, exist_ok=True)
    index = {"optimum_version": version("optimum"), "optimum_onnx_version": version("optimum-onnx"),
             "torch_version": version("torch"), "transformers_version": version("transformers"), "exports": {}}
    for name, (family, task) in EXPORTS.items():
        dest = OUT / name
        shutil.rmtree(dest, ignore_errors=True)
        scratch = OUT / f".{name}.tmp"
        shutil.rmtree(scratch, ignore_errors=True)
        main_export(str(SOURCE / family), output=str(scratch), task=task, device="cpu")
        dest.mkdir()
        for f in KEEP:
            shutil.copy(scratch / f, dest / f)
        shutil.rmtree(scratch)
        index["exports"][name] = {"family": family, "task": task, "files": list(KEEP)}
        print(f"wrote {dest}")
    (OUT / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
