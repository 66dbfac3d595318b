"""The Apache TVM backend: IR -> Relax + TIR -> a compiled library beside the weights.

``targets.py`` maps kiln's presets to TVM targets, ``weight_plan.py`` decides how each weight
is stored, ``lower.py`` turns the graph into a Relax module (one function per op),
``attention.py`` holds the KV-cache and attention kernels, ``quant_kernels.py`` the matmuls and
lookups that read GGUF blocks as they are (stored as ``quant_layout.py`` lays them out, read as
``tile_reader.py`` reads a tile), ``moe.py`` the mixture-of-experts kernels, ``gated_silu.py``
the SwiGLU activation, ``kernel_common.py`` what the kernels share, ``float_kernels.py`` those
over float weights kept in their own type (bf16 stays 2 bytes), and ``build.py`` compiles and
writes the artifact's files. ``kiln.runtime.tvm_session`` runs it.
Nothing here is imported unless a TVM artifact is compiled or run.
"""
