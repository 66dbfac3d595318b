"""Run under a Python that has llama-cpp-python: llama.cpp's own quantizer on one GGUF file.

    python llama_cpp_quantize.py IN.gguf OUT.gguf FTYPE

FTYPE is a llama.cpp file type name as llama-quantize spells it (Q4_K_M, Q6_K, ...). Exits
non-zero when llama_model_quantize reports a failure.
"""
import ctypes
import sys

import llama_cpp

src, dst, ftype = sys.argv[1], sys.argv[2], sys.argv[3]
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}")
params.nthread = 2
rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
sys.exit(int(rc))
