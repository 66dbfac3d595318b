#!/usr/bin/env bash
# Builds the onnxruntime-genai int4 CPU folder that benchmarks/decode_bench.py --oga times, with
# onnxruntime-genai's own model builder, from the SmolLM2 bf16 Hugging Face folder kiln writes.
#
#   benchmarks/build_ortgenai_model.sh OGA_PYTHON HF_DIR OGA_DIR
#
# OGA_PYTHON  python of a venv with onnxruntime-genai and the builder's dependencies
#             (see benchmarks/README.md)
# HF_DIR      the bf16 HF folder; made here with `kiln convert smollm2 HF_DIR --to hf --dtype bf16`
#             when it does not exist yet (the same folder serves the transformers peer, --hf)
# OGA_DIR     where the builder writes model.onnx, its data and genai_config.json
#
# kiln is taken from the repository's .venv unless KILN names another kiln command.
set -euo pipefail

if [ "$#" -ne 3 ]; then
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
oga_python=$1
hf_dir=$2
oga_dir=$3
repo=$(cd "$(dirname "$0")/.." && pwd)
kiln=${KILN:-$repo/.venv/bin/kiln}

"$oga_python" -c "import onnxruntime_genai" || {
    echo "build_ortgenai_model.sh: $oga_python cannot import onnxruntime_genai" >&2
    exit 1
}

if [ ! -f "$hf_dir/config.json" ]; then
    "$kiln" convert smollm2 "$hf_dir" --to hf --dtype bf16
fi

cache=$(mktemp -d)
trap 'rm -rf "$cache"' EXIT
# -i: a model folder on disk (-m would name a model on the Hugging Face hub); int4 weights,
# the CPU execution provider; prune_lm_head: the LM head over the last position only in prefill,
# as every engine is timed (by default the builder's graph computes logits for every position)
"$oga_python" -m onnxruntime_genai.models.builder -i "$hf_dir" -o "$oga_dir" -p int4 -e cpu -c "$cache" \
    --extra_options prune_lm_head=true
test -f "$oga_dir/genai_config.json"
echo "wrote $oga_dir"
