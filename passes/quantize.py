"""Quantization: a float model's weights become block-quantized weights, chosen per tensor.

The scheme (one block type, or a llama.cpp mixture such as q4_k_m) says which type each
weight gets (``kiln.quant_schemes``); norms, biases, other 1-D tensors and position
embeddings stay as they are, and so does a matrix whose rows fit no block type (llama.cpp
would store it as F16; here the float source is kept).

Nothing is quantized by the pass itself: each chosen weight is replaced by a lazy one that
quantizes from the source when the lowering reads it, so the model is never held quantized
in memory as a whole. A weight with several readers (a tied embedding is both the Gather
table and the head) keeps its blocks once made, so it is quantized once. The quantized
matmul fusion and the ONNX Runtime lowering then take these blocks as they take a GGUF's.

Stats count the weights per type chosen, plus ``kept_<format>`` for those left as they were.
``graph.meta["quantization"]`` records the scheme and the counts for the manifest.
"""
from __future__ import annotations

from kiln import formats
from kiln.ir import Graph
from kiln.passes_base import PassResult
from kiln.quant_schemes import Layout, Scheme, get
from kiln.weights import Weight


class _Once:
    """A loader that keeps what it loaded: for a weight read more than once."""

    def __init__(self, load):
        self._load, self._data = load, None

    def __call__(self):
        if self._data is None:
            self._data = self._load()
        return self._data


def quantized(w: Weight, fmt_name: str, *, keep: bool = False, importance=None) -> Weight:
    """``w`` stored as ``fmt_name``, quantized from its values on demand (``keep``: once),
    weighted by ``importance`` (per column) when given."""
    fmt = formats.get(fmt_name)
    if not keep:
        return w.astype(fmt, importance)
    return Weight(w.shape, fmt, _Once(lambda: fmt.quantize(w.numpy(), importance)), name=w.name, origin=w.origin)


def quantize(graph: Graph, scheme: str | Scheme, layout: Layout, *, requantize: bool = False,
             importance: dict | None = None) -> PassResult:
    """Quantize the graph's weights (named by their canonical roles) as ``scheme`` says.
    ``importance``: role -> per-column weights (from an importance matrix) for the quantizers.

    A weight already in a block format is refused unless ``requantize``: quantizing blocks
    again loses precision a second time (the driver turns this into a one-line error).
    """
    scheme = get(scheme) if isinstance(scheme, str) else scheme
    stats: dict[str, int] = {}
    chosen = {}
    for name, v in graph.weights.items():
        w = v.weight
        t = scheme.type_for(name, w.shape, layout)
        if t is None or not formats.get(t).is_block:
            chosen[name] = None
            continue
        if w.format.is_block and not requantize:
            raise ValueError(f"weight {name} is already quantized ({w.format.name}); "
                             f"quantizing it again to {t} needs requantize=True")
        chosen[name] = t
    changed = False
    for name, t in chosen.items():
        v = graph.weights[name]
        if t is None:
            key = f"kept_{v.weight.format.name}"
        else:
            if t != v.weight.format.name:
                readers = {id(u.node) for u in v.uses}
                v.weight = quantized(v.weight, t, keep=len(readers) > 1, importance=(importance or {}).get(name))
                changed = True
            key = t
        stats[key] = stats.get(key, 0) + 1
    graph.meta["quantization"] = {
        "scheme": scheme.name, "kind": "mixture" if scheme.mixture else "type", "requantized": bool(requantize),
        "formats": {k: n for k, n in sorted(stats.items()) if not k.startswith("kept_")},
        "kept_float": sum(n for k, n in stats.items() if k.startswith("kept_")),
        **({"imatrix_tensors": sum(1 for n, t in chosen.items() if t and n in importance)} if importance else {}),
    }
    ordered = dict(sorted(stats.items(), key=lambda kv: (kv[0].startswith("kept_"), kv[0])))
    return PassResult(graph, changed, ordered)


def quantize_pass(scheme: str | Scheme, layout: Layout, *, requantize: bool = False, importance: dict | None = None):
    """The pass as the pipeline takes it: graph -> PassResult."""
    def run(graph: Graph) -> PassResult:
        return quantize(graph, scheme, layout, requantize=requantize, importance=importance)
    return run
