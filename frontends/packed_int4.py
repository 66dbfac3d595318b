"""GPTQ and AWQ checkpoints: Hugging Face folders whose config.json has a ``quantization_config``
(``quant_method`` "gptq" or "awq", 4 bits), read into kiln's int4 block weights.

Each quantized linear layer ``P`` is stored as int32 words of eight 4-bit fields (low bits
first) and half scales, one scale and zero per group of ``group_size`` input values
(``-1``: the whole row), the value being ``scale · (code − zero)``:

* GPTQ (AutoGPTQ, GPTQModel, optimum): ``P.qweight`` [K/8, N] packed along the input
  dimension K, ``P.qzeros`` [groups, N/8] and ``P.scales`` [groups, N] along the output N,
  ``P.g_idx`` [K] the group of each input (``desc_act`` orders them by activation size, so
  a group's inputs need not be neighbours). The classic format (``checkpoint_format`` "gptq",
  the default) stores each zero minus one; "gptq_v2" stores it as is.
* AWQ GEMM (AutoAWQ): ``P.qweight`` [K, N/8] and ``P.qzeros`` [groups, N/8] packed along the
  output dimension with the eight outputs of a word interleaved (field i holds output
  ``AWQ_ORDER[i]``), ``P.scales`` [groups, N]; groups are consecutive inputs.

Every layer becomes ``P.weight`` [N, K] in ``int4_gB`` (``kiln.formats.int4_group``, B the
largest of 256/128/64/32 whose blocks each lie in one group): the same codes, scales and zeros,
kept quantized for the backends. Under desc_act the groups are runs only once the inputs are
sorted by group: the blocks hold the sorted inputs (``input_order``) and the graph gathers x
into that order (docs/design-notes.md). Groups no block size tiles (not multiples of 32) and
scales stored as anything but float16 are dequantized to float32 instead: exact, only larger.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kiln.errors import KilnError, load_json_object
from kiln.formats import int4_group
from kiln.weights import Weight

#: the output field of each 4-bit slot of an AWQ word (AutoAWQ's pack order)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_SHIFTS = np.arange(0, 32, 4, dtype=np.uint32)
_PARTS = ("qweight", "qzeros", "scales")


@dataclass(frozen=True)
class Scheme:
    method: str                  # "gptq" or "awq"
    group_size: int              # values per scale; -1: the whole row
    zeros_minus_one: bool        # GPTQ's classic checkpoint_format
    config: Path                 # for messages

    @property
    def title(self) -> str:
        return self.method.upper()

    def summary(self) -> dict:
        """What a model's source records of it (the manifest, ``kiln convert``'s notes)."""
        return {"method": self.method, "bits": 4, "group_size": self.group_size,
                **({"checkpoint_format": "gptq" if self.zeros_minus_one else "gptq_v2"} if self.method == "gptq" else {})}


def scheme(raw_cfg: dict, folder: Path) -> Scheme | None:
    """The folder's quantization, or None for a float checkpoint; an unsupported one is an error
    naming the config key."""
    path = folder / "config.json"
    q = raw_cfg.get("quantization_config")
    if q is None and (folder / "quantize_config.json").is_file():
        # AutoGPTQ before transformers read GPTQ: the config in a file of its own
        path = folder / "quantize_config.json"
        q = {"quant_method": "gptq", **load_json_object(path, unreadable="not a readable JSON file",
                                                       not_object="not a JSON object")}
    if q is None:
        return None
    if not isinstance(q, dict):
        raise KilnError(path, "quantization_config is not a JSON object")
    method = q.get("quant_method")
    if method == "mxfp4":
        # gpt-oss's experts: read as MXFP4 blocks by the family's own reader (frontends/moe.py);
        # a family without that reader finds its expert tensors missing and says so
        return None
    if method not in ("gptq", "awq"):
        raise KilnError(path, f"quantization_config quant_method {_show(method)} is not supported "
                              f"(kiln reads gptq and awq checkpoints, and gpt-oss's mxfp4 experts)")
    bits = q.get("bits", q.get("w_bit"))
    if bits != 4 or isinstance(bits, bool):
        raise KilnError(path, f"quantization_config bits {_show(bits)}: kiln reads 4-bit {method.upper()} checkpoints")
    group = q.get("group_size", q.get("q_group_size"))
    if isinstance(group, bool) or not isinstance(group, int) or not (group == -1 or 0 < group < 2**31):
        raise KilnError(path, f"quantization_config group_size {_show(group)} is not a positive whole number or -1")
    if method == "awq":
        version = q.get("version", "gemm")
        if not isinstance(version, str) or version.lower() != "gemm":
            raise KilnError(path, f"quantization_config version {_show(version)}: kiln reads AWQ's GEMM layout")
        if q.get("zero_point", True) is not True:
            raise KilnError(path, "quantization_config zero_point is false: kiln reads AWQ checkpoints with zero points")
        return Scheme("awq", group, False, path)
    fmt = q.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise KilnError(path, f"quantization_config checkpoint_format {_show(fmt)} is not supported "
                              f"(kiln reads gptq and gptq_v2)")
    return Scheme("gptq", group, fmt == "gptq", path)


def _show(v) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def unpack(tensors: dict[str, Weight], s: Scheme, folder: Path) -> dict[str, Weight]:
    """The checkpoint's tensors with every quantized layer's parts replaced by its weight."""
    prefixes = [name[:-len(".qweight")] for name in tensors if name.endswith(".qweight")]
    if not prefixes:
        raise KilnError(s.config, f"quantization_config says {s.title}, but no tensor is a .qweight")
    out = dict(tensors)
    for p in prefixes:
        parts = {}
        for part in _PARTS + (("g_idx",) if s.method == "gptq" else ()):
            w = out.pop(f"{p}.{part}", None)
            if w is None and part != "g_idx":
                raise KilnError(folder, f"tensor {p}.{part} is missing (every {s.title} layer stores "
                                        f"{', '.join(_PARTS)})")
            parts[part] = w
        out[f"{p}.weight"] = _layer(p, parts, s, folder)
    return out


def _layer(p: str, parts: dict, s: Scheme, folder: Path) -> Weight:
    qweight, qzeros, scales = (parts[k] for k in _PARTS)
    g_idx = parts.get("g_idx")
    origin = qweight.origin or str(folder)

    def fail(msg):
        raise KilnError(origin, f"{p}: {msg}")
    for name, w in (("qweight", qweight), ("qzeros", qzeros), ("g_idx", g_idx)):
        if w is not None and w.format.name != "i32":
            fail(f"{name} is {w.format.name}, not the int32 words {s.title} packs codes in")
    if scales.format.name not in ("f16", "bf16", "f32"):
        fail(f"scales are {scales.format.name}, not floats")
    if len(qweight.shape) != 2 or len(scales.shape) != 2 or len(qzeros.shape) != 2:
        fail(f"qweight {list(qweight.shape)}, qzeros {list(qzeros.shape)} and scales {list(scales.shape)} "
             f"are not all matrices")
    k, n = (qweight.shape[0] * 8, qweight.shape[1]) if s.method == "gptq" else (qweight.shape[0], qweight.shape[1] * 8)
    group = k if s.group_size == -1 else s.group_size
    groups = -(-k // group)
    want = {"scales": (scales, (groups, n)), "qzeros": (qzeros, (groups, n // 8))}
    if g_idx is not None:
        want["g_idx"] = (g_idx, (k,))
    for name, (w, shape) in want.items():
        if w.shape != shape or n % 8:
            fail(f"{name} has shape {list(w.shape)}; the {s.title} qweight {list(qweight.shape)} with group_size "
                 f"{s.group_size} needs {list(shape)}")
    order = None if g_idx is None else g_idx.raw().view(np.int32).reshape(-1)
    if order is not None and (order.min(initial=0) < 0 or order.max(initial=0) >= groups):
        fail(f"g_idx names groups outside 0..{groups - 1}")
    if order is None:
        order = np.arange(k) // group
    # inputs sorted by group (stably: in order where they already are); a block needs all its
    # inputs in one group, and desc_act's groups are runs of group_size once sorted
    perm = np.argsort(order, kind="stable")
    sorted_groups = order[perm]
    block = next((b for b in int4_group.GROUPS if k % b == 0 and
                  (sorted_groups.reshape(-1, b) == sorted_groups[::b, None]).all()), None)

    def parts_of():
        """(codes uint8 [N, K], zeros [groups, N], scales float16-or-wider [groups, N])."""
        codes = _gptq_codes(qweight) if s.method == "gptq" else _awq_fields(qweight.raw())
        zeros = (_fields(qzeros.raw()) if s.method == "gptq" else _awq_fields(qzeros.raw())).astype(np.int16)
        if s.zeros_minus_one:
            zeros += 1
        return codes.T if s.method == "awq" else codes, zeros, scales.numpy() if scales.format.name != "f16" \
            else scales.raw().view(np.float16).reshape(groups, n)

    def load_float():
        codes, zeros, sc = parts_of()
        sc32 = sc.astype(np.float32)[order].T                 # [N, K]: each input's group
        values = sc32 * (codes.astype(np.float32) - zeros[order].T.astype(np.float32))
        return np.ascontiguousarray(values, dtype=np.float32).view(np.uint8)

    def load_blocks():
        codes, zeros, sc = parts_of()
        first = sorted_groups[::block]                         # the group of each block
        codes = codes if shuffled is None else codes[:, perm]
        return int4_group.encode(codes.reshape(n * (k // block), block), sc[first].T.reshape(-1),
                                 zeros[first].T.reshape(-1)).reshape(-1)

    name = f"{p}.weight"
    shuffled = None if np.array_equal(perm, np.arange(k)) else perm
    if block is None or scales.format.name != "f16":
        return Weight((n, k), "f32", load_float, name=name, origin=origin)
    blocks = Weight((n, k), int4_group.name_for(block), load_blocks, name=name, origin=origin)
    if shuffled is None:
        return blocks
    # desc_act: the layer's values, in the checkpoint's input order, for whatever reads weights
    # (conversion, LoRA merges); the graph multiplies the blocks of the sorted inputs by the
    # activations gathered into that order (frontends/builder.py: _linear)
    blocks.input_order = shuffled
    values = Weight((n, k), "f32", load_float, name=name, origin=origin)
    values.sorted_blocks = blocks
    return values


def in_checkpoint_order(model):
    """The model's graph with each desc_act layer as its float32 values in checkpoint order and
    no gathered activations: for whatever maps the graph's matrices back onto the checkpoint's
    tensors (an ONNX export, an importance matrix) or requantizes them. The model's own graph
    where it has no such layer."""
    if not any(getattr(w, "sorted_blocks", None) is not None for w in model.weights.values()):
        return model.graph
    from .arch import ArchConfig
    from .builder import build_graph
    plain = {role: w.map_values(lambda a: a) if getattr(w, "sorted_blocks", None) is not None else w
             for role, w in model.weights.items()}
    return build_graph(ArchConfig.from_dict(model.config), plain, name=model.graph.name)


def _fields(words: np.ndarray) -> np.ndarray:
    """int32 words [R, C] -> their 4-bit fields [R, 8C], low bits first."""
    w = np.ascontiguousarray(words).view(np.uint32)
    return ((w[:, :, None] >> _SHIFTS) & 15).astype(np.uint8).reshape(w.shape[0], -1)


def _gptq_codes(qweight: Weight) -> np.ndarray:
    """GPTQ's qweight [K/8, N], packed along K -> codes [N, K]."""
    w = qweight.raw().view(np.uint32)
    return ((w[:, None, :] >> _SHIFTS[None, :, None]) & 15).astype(np.uint8).reshape(-1, w.shape[1]).T


def _awq_fields(words: np.ndarray) -> np.ndarray:
    """AWQ's words [R, C] -> the fields [R, 8C] in output order (undoing the interleave)."""
    fields = _fields(words).reshape(words.shape[0], -1, 8)
    out = np.empty_like(fields)
    out[:, :, list(AWQ_ORDER)] = fields
    return out.reshape(words.shape[0], -1)
