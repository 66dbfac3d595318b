"""Each block format describes its layout once (compiler/formats/layout.py): the one test that
the numpy codec, ONNX Runtime's repack (targets/onnxrt/quant.py) and TVM's stored arrays
(targets/tvm/quant_layout.py) all read a block as its layout says, for every format that has one."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from kiln import formats
from kiln.formats import int4_group
from kiln.targets.onnxrt import quant as ort_quant
from kiln.targets.tvm import quant_layout
from kiln.weights import Weight

ROOT = Path(__file__).resolve().parents[1]
LAID_OUT = sorted(name for name, f in formats.all_formats().items() if f.layout is not None)
GGUF_LAID_OUT = [name for name in LAID_OUT if formats.get(name).gguf_type is not None]
ROWS = 5                # odd: TVM pads the last tile of 16 rows


def test_every_gguf_block_format_kiln_runs_natively_has_a_layout():
    assert GGUF_LAID_OUT == ["q2_k", "q3_k", "q4_0", "q4_1", "q4_k", "q5_0", "q5_1", "q5_k", "q6_k", "q8_0"]
    # the others: GPTQ's and AWQ's int4 groups (tests/test_gptq_awq.py checks their codec)
    assert set(LAID_OUT) - set(GGUF_LAID_OUT) == int4_group.NAMES
    assert quant_layout.SUPPORTED == set(LAID_OUT) and ort_quant.REPACK <= set(LAID_OUT)


def _blocks(fmt, k: int, seed: int, finite: bool = True) -> np.ndarray:
    """ROWS rows of k // block_size blocks: random bytes, with every half made a finite one
    (NaN payloads are the numpy codec's business, checked below against gguf)."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (ROWS * (k // fmt.block_size), fmt.type_size), dtype=np.uint8)
    if finite:
        # every half field (found through the unpack) rewritten to a small finite value
        halves = rng.uniform(-0.01, 0.01, raw.shape[0]).astype(np.float16)
        for name, dtype, _ in fmt.layout.params:
            if dtype == "float16":
                at = _half_offset(fmt, raw, name)
                raw[:, at:at + 2] = halves[:, None].view(np.uint8).reshape(-1, 2)
    return raw


def _half_offset(fmt, raw, name) -> int:
    """The byte offset of a half param, found by changing one byte at a time."""
    base = fmt.layout.unpack(raw[:1].copy())[1][name].view(np.uint16).copy()
    for at in range(fmt.type_size - 1):
        probe = raw[:1].copy()
        probe[0, at] ^= 0xFF
        probe[0, at + 1] ^= 0xFF
        if (fmt.layout.unpack(probe)[1][name].view(np.uint16) == (base ^ 0xFFFF)).all():
            return at
    raise AssertionError(f"{fmt.name}: no half {name}")


@pytest.mark.parametrize("name", LAID_OUT)
def test_the_layout_is_consistent(name):
    fmt = formats.get(name)
    lay = fmt.layout
    raw = _blocks(fmt, fmt.block_size, 0, finite=False)
    codes, params = lay.unpack(raw)
    assert codes.dtype == np.uint8 and codes.shape == (len(raw), fmt.block_size)
    assert codes.max() < 1 << lay.bits and lay.offset < 1 << lay.bits
    assert sorted(params) == sorted(p for p, _, _ in lay.params)
    for p, dtype, span in lay.params:
        assert params[p].dtype == np.dtype(dtype) and params[p].shape == (len(raw), fmt.block_size // span)
        assert span % lay.group == 0
    # the codes' bits fit in the block beside its scales
    assert sum(lay.planes) * fmt.block_size // 8 <= fmt.type_size


@pytest.mark.parametrize("name", GGUF_LAID_OUT)
def test_the_numpy_codec_is_the_layout_and_gguf_s(name):
    """Random bytes (half infinities, NaNs, subnormals): the codec is the layout's formula, bit
    for bit gguf's."""
    fmt = formats.get(name)
    raw = _blocks(fmt, 2 * fmt.block_size, 1, finite=False)
    got = fmt.dequantize_blocks(raw)
    with np.errstate(all="ignore"):
        want = gguf_dequantize(raw.reshape(ROWS, -1), GGMLQuantizationType(fmt.gguf_type)).reshape(got.shape)
    assert (got.view(np.uint32) == want.astype(np.float32).view(np.uint32)).all()
    assert (got.view(np.uint32) == fmt.layout.dequantize(raw).view(np.uint32)).all()


@pytest.mark.parametrize("name", sorted(ort_quant.REPACK))
def test_onnx_runtime_operands_are_the_layout(name):
    fmt = formats.get(name)
    k = 2 * fmt.block_size
    raw = _blocks(fmt, k, 2)
    op = ort_quant.operands(name, raw, ROWS, k)
    zp = op.zero_points if op.zero_points is not None else np.full(op.scales.shape, 1 << (op.bits - 1))
    values = op.scales[..., None] * (op.codes.astype(np.float32) - zp[..., None].astype(np.float32))
    if op.mins is not None:
        values = values + op.mins[..., None]
    want = fmt.dequantize(raw, (ROWS, k))
    # scale · (code − zero point) is exact; the bias added once: exact to one rounding
    np.testing.assert_allclose(values.reshape(ROWS, k), want, rtol=0, atol=1e-6 * float(np.abs(want).max()))
    assert op.block == fmt.layout.group and op.codes.max() < 1 << op.bits


@pytest.mark.parametrize("name", LAID_OUT)
def test_tvm_arrays_hold_the_layout(name):
    """TVM's stored arrays (bit planes and params tiled by 16 rows) give back the layout's codes
    and params exactly; the kernels' arithmetic is the layout's scale and bias
    (tests/test_tvm_quant_kernels.py runs them)."""
    fmt = formats.get(name)
    k = 2 * fmt.block_size
    raw = _blocks(fmt, k, 3)
    w = Weight((ROWS, k), fmt, lambda: raw.reshape(-1), name="w")
    arrays = quant_layout.pack(w)
    spec = quant_layout._FORMATS[name]
    codes, params = fmt.layout.unpack(raw)
    rows = lambda a: a.transpose(0, 2, 1).reshape(-1, a.shape[1])[:ROWS]       # noqa: E731
    got, shift = np.zeros((ROWS, k), np.uint32), 0
    for width in spec.planes:
        words = rows(arrays[f"bits{width}"])
        per = 32 // width
        fields = (words[:, :, None] >> (np.arange(per, dtype=np.uint32) * width)) & ((1 << width) - 1)
        got |= fields.reshape(ROWS, k) << shift
        shift += width
    assert (got == codes.reshape(ROWS, k)).all()
    for p, dtype, span in spec.params:
        assert (rows(arrays[p]) == params[p].reshape(ROWS, k // span)).all(), p
    assert (spec.group, spec.offset, spec.decode) == (fmt.layout.group, fmt.layout.offset, fmt.layout.unpack)


def test_no_backend_decodes_blocks_itself():
    """The backends read blocks through the layouts only: no format's private helpers and no
    bit-level helpers of their own."""
    for path in (ROOT / "targets/onnxrt/quant.py", ROOT / "targets/tvm/quant_layout.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kiln.formats"):
                assert not (node.module.split(".")[-1].startswith("_") or
                            any(a.name.startswith("_") for a in node.names)), (path.name, node.module)
            if isinstance(node, ast.FunctionDef):
                assert "f16" not in node.name and "unpack" not in node.name, (path.name, node.name)
