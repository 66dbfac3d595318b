"""``kiln imatrix``: an importance matrix from running a model over calibration text.

As llama.cpp's ``llama-imatrix`` does: the text's tokens are cut into windows of ``ctx``
tokens (whole windows only; the first token of each is BOS when the tokenizer adds one), each
window runs through the model, and for every matrix of a layer (what a quantizer touches;
llama-imatrix leaves out the head and the embedding too) the squared activations entering
it are summed per input column, with the number of rows summed. The model runs on kiln's
reference interpreter (``kiln.interp``) over the float graph, which frees each intermediate
after its last use: only one window's activations are alive at a time.

Entries are named by the model's GGUF tensor names (``blk.N.attn_q.weight``), so the file
serves ``llama-quantize --imatrix`` and ``kiln convert/compile --quant --imatrix`` alike. A
family whose GGUF file fuses q/k/v or gate/up (phi3, gpt2) gets one entry for the fused
matrix: its parts read the same input.
"""
from __future__ import annotations

import numpy as np

from .errors import KilnError
from .imatrix_file import Entry, ImportanceMatrix


def gguf_name(role: str, family) -> str | None:
    """The GGUF tensor name of a layer matrix's role (``layers.3.q.weight`` ->
    ``blk.3.attn_q.weight``), the fused tensor's for a part of one; None for other roles."""
    from kiln.frontends.arch import FUSED
    parts = role.split(".")
    if len(parts) != 4 or parts[0] != "layers" or parts[3] != "weight":
        return None
    i, kind = parts[1], parts[2]
    table = family.gguf_names
    for fused, members in FUSED.items():
        if f"layers.{{i}}.{fused}.weight" in table and kind in {name for name, _ in members}:
            kind = fused
    name = table.get(f"layers.{{i}}.{kind}.weight")
    return name.replace("{i}", i) if name else None


def _matmul_inputs(graph, family) -> dict[int, str]:
    """id(MatMul node) -> GGUF name, for products of an activation with a layer matrix (the
    builder's ``x @ Transpose(W)``)."""
    weights = {id(v): name for name, v in graph.weights.items()}
    out = {}
    for node in graph.nodes:
        if node.op != "MatMul" or len(node.inputs) < 2:
            continue
        w = node.inputs[1]
        if w.producer is not None and w.producer.op == "Transpose":
            w = w.producer.inputs[0]
        role = weights.get(id(w))
        name = gguf_name(role, family) if role else None
        if name is not None:
            out[id(node)] = name
    return out


def windows(ids: list[int], ctx: int, chunks: int | None, bos: int | None) -> list[np.ndarray]:
    n = len(ids) // ctx
    if chunks:
        n = min(n, chunks)
    out = []
    for k in range(n):
        w = np.asarray(ids[k * ctx:(k + 1) * ctx], dtype=np.int64)
        if bos is not None:
            w[0] = bos
        out.append(w)
    return out


def collect(model, ids: list[int], *, ctx: int = 512, chunks: int | None = None, dataset: str = "",
            progress=None) -> ImportanceMatrix:
    """Run ``model`` (a ModelIR) over ``ids`` in windows; ``progress(done, total)`` after each."""
    from kiln.frontends.arch import FAMILIES
    from kiln.interp import Interpreter
    family = FAMILIES[model.config["family"]]
    spec = model.tokenizer
    bos = spec.bos_id if spec is not None and spec.add_bos else None
    todo = windows(ids, ctx, chunks, bos)
    if not todo:
        raise KilnError(dataset or None, f"has {len(ids)} tokens, fewer than one window of --ctx {ctx}")
    from kiln.frontends.packed_int4 import in_checkpoint_order
    graph = in_checkpoint_order(model)      # columns in the checkpoint's order, as GGUF's tensors
    names = _matmul_inputs(graph, family)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    seen: set[tuple[str, int]] = set()

    def observe(node, args):
        name = names.get(id(node))
        if name is None:
            return
        x = args[0]
        # a fused matrix's parts read the same activation: count it once per window
        key = (name, id(x))
        if key in seen:
            return
        seen.add(key)
        rows = x.reshape(-1, x.shape[-1]).astype(np.float64)
        sums[name] = sums.get(name, 0) + np.einsum("ij,ij->j", rows, rows)
        counts[name] = counts.get(name, 0) + rows.shape[0]

    interp = Interpreter(graph)
    for k, w in enumerate(todo):
        seen.clear()
        interp.run({"input_ids": w[None, :]}, observe=observe)
        if progress is not None:
            progress(k + 1, len(todo))
    for name, s in sums.items():
        if not np.all(np.isfinite(s)):
            raise KilnError(None, f"the activations entering {name} are not finite: the model overflows on this text")
    entries = {name: Entry(sums[name].astype(np.float32), np.array([counts[name]], dtype=np.float64))
               for name in sorted(sums)}
    return ImportanceMatrix(entries, datasets=[dataset] if dataset else [], chunk_count=len(todo), chunk_size=ctx)


def read_text(path) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise KilnError(path, f"cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise KilnError(path, "not UTF-8 text") from None


def tokenize(model, text: str, path=None) -> list[int]:
    if model.tokenizer is None:
        raise KilnError(model.source.get("path") or path, "has no tokenizer to read the calibration text with")
    return list(model.tokenizer.tokenizer.encode(text, add_special_tokens=False).ids)


def load_for_quantizing(path, model_names=None) -> ImportanceMatrix:
    """An importance matrix for --imatrix, checked against the GGUF names of the matrices it
    will weight (``model_names``: name -> columns): a file whose entries name none of them, or
    give one a different width, was made for another model."""
    from . import imatrix_file
    im = imatrix_file.read(path)
    if model_names is not None:
        common = [n for n in im.entries if n in model_names]
        if not common:
            some = ", ".join(sorted(im.entries)[:2])
            raise KilnError(path, f"is an importance matrix for another model: none of its entries ({some}, ...) "
                                  f"is a matrix of this one")
        for n in common:
            cols = model_names[n]
            got = im.entries[n].sums.size // max(len(im.entries[n].counts), 1)
            if got != cols:
                raise KilnError(path, f"is an importance matrix for another model: {n} has {got} columns here, "
                                      f"{cols} in the model")
    return im
