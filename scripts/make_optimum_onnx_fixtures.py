"""Regenerate tests/data/onnx_optimum/: decoder exports made by optimum itself, for the ONNX
frontend's tests (tests/test_onnx_io.py).

Needs optimum, torch and transformers, which the kiln venv deliberately does not have. Use a
separate venv outside the repository (torch 2.13.0 CPU installs from this machine's disk):

    python3 -m venv /work/peers/optimum
    /work/peers/optimum/bin/pip install 'optimum[onnxruntime]' torch==2.13.0 onnxscript
    /work/peers/optimum/bin/python scripts/make_optimum_onnx_fixtures.py

Each export is what ``optimum-cli export onnx --model FIXTURE --task TASK OUT`` writes
(model.onnx with its weights inline, config.json, generation_config.json) for one of the
shared fixture families in tests/data/fixtures/hf/, so the family's ``reference.npz``
(transformers' own logits and greedy tokens) is the reference for the export too. The set
covers what differs between exports: with and without past KV, a norm weight the exporter
folds into a constant (gemma's ``1 + weight``), GPT-2's Conv1D weights and biases, phi3's
fused q/k/v and gate/up projections. ``llama-torch-dynamo`` is not optimum's: torch's newer
(dynamo) exporter, which names nodes ``node_linear`` and keeps the module path in node
metadata, run on the model inside a wrapper module (so every parameter name is prefixed, as
in a user's own export script), with its weights in external data (``model.onnx.data``).
``index.json`` records the versions and the tasks.
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
    index["exports"]["llama-torch-dynamo"] = {"family": "llama", "task": "torch.onnx.export(dynamo=True), no cache",
                                              "files": _dynamo_export("llama", OUT / "llama-torch-dynamo")}
    index["onnxscript_version"] = version("onnxscript")
    (OUT / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return 0


def _dynamo_export(family: str, dest: Path) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir()
    model = AutoModelForCausalLM.from_pretrained(SOURCE / family, dtype=torch.float32).eval()

    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids):
            return self.m(input_ids=input_ids, use_cache=False).logits

    torch.onnx.export(Wrapper(model), (torch.tensor([[1, 5, 7, 9]]),), str(dest / "model.onnx"), dynamo=True,
                      input_names=["input_ids"], output_names=["logits"],
                      dynamic_shapes={"input_ids": {0: "batch", 1: "seq"}}, external_data=True)
    for f in ("config.json", "generation_config.json"):
        shutil.copy(SOURCE / family / f, dest / f)
    print(f"wrote {dest}")
    return sorted(p.name for p in dest.iterdir())


if __name__ == "__main__":
    sys.exit(main())
