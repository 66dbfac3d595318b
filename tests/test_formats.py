"""GGUF block formats: bit-exact with the gguf package, and sound where gguf has no quantizer.

"Bit-exact" is meant literally: float outputs are compared as uint32 bit patterns (so a
-0.0 for a 0.0, or a different NaN, would fail), byte outputs byte for byte.
"""
from __future__ import annotations

import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kiln import formats
from kiln.weights import Weight

LEGACY = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]
EXTRA = ["tq1_0", "tq2_0", "mxfp4"]
GGUF_QUANTIZES = LEGACY + EXTRA                          # quantize byte for byte like gguf
K_QUANTS = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]      # gguf only reads these; kiln writes
READ_ONLY = ["iq4_nl", "iq4_xs"]                         # kiln only reads these
ALL = GGUF_QUANTIZES + K_QUANTS + READ_ONLY


def gguf_type(fmt) -> GGMLQuantizationType:
    return GGMLQuantizationType(fmt.gguf_type)


def reference_quantize(fmt, x: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        return gguf_quantize(x, gguf_type(fmt)).reshape(-1)


def reference_dequantize(fmt, raw: np.ndarray, shape) -> np.ndarray:
    with np.errstate(all="ignore"):
        return gguf_dequantize(raw.reshape(-1, fmt.type_size), gguf_type(fmt)).reshape(shape)


def assert_same_bits(a: np.ndarray, b: np.ndarray):
    assert a.shape == b.shape and a.dtype == b.dtype == np.float32
    diff = a.view(np.uint32) != b.view(np.uint32)
    assert not diff.any(), f"{diff.sum()} values differ, first at {np.argwhere(diff)[0]}: {a[diff][:3]} vs {b[diff][:3]}"


def assert_same_bytes(ours: np.ndarray, ref: np.ndarray, type_size: int):
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    bad = np.flatnonzero(np.any(ours.reshape(-1, type_size) != ref.reshape(-1, type_size), axis=1))
    assert bad.size == 0, f"{bad.size} blocks differ, first block {bad[0]}: {ours.reshape(-1, type_size)[bad[0]]} vs {ref.reshape(-1, type_size)[bad[0]]}"


def rel_rmse(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sqrt(np.mean((x - y) ** 2)) / np.sqrt(np.mean(x ** 2)))


# ---- registry ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_registered_with_gguf_sizes(name):
    fmt = formats.get(name)
    assert formats.from_gguf_type(fmt.gguf_type) is fmt
    assert (fmt.block_size, fmt.type_size) == GGML_QUANT_SIZES[gguf_type(fmt)]
    assert fmt.is_block and fmt.name == name


# ---- dequantize: every format, bit-exact ---------------------------------------------------

@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("rows,blocks_per_row", [(1, 1), (3, 2), (40, 6)])
def test_dequantize_random_bytes_bit_exact(name, rows, blocks_per_row):
    """Arbitrary bytes, so scales include half infinities, NaNs and subnormals."""
    fmt = formats.get(name)
    rng = np.random.default_rng([rows, blocks_per_row, fmt.gguf_type])
    raw = rng.integers(0, 256, (rows, blocks_per_row * fmt.type_size), dtype=np.uint8)
    shape = (rows, blocks_per_row * fmt.block_size)
    assert_same_bits(fmt.dequantize(raw, shape), reference_dequantize(fmt, raw, shape))


@pytest.mark.parametrize("name", ALL)
def test_dequantize_tame_blocks_bit_exact(name):
    """Bytes with finite, moderate half scales, as real files have them."""
    fmt = formats.get(name)
    rng = np.random.default_rng(fmt.gguf_type)
    raw = rng.integers(0, 256, (64, fmt.type_size), dtype=np.uint8)
    if name == "mxfp4":   # its scale is an exponent byte
        raw[:, 0] = rng.integers(100, 150, 64)
    else:
        # the other formats keep their halves at even offsets: clearing the top exponent bit
        # of every aligned byte pair makes them all finite and below 2
        raw.view(np.uint16)[...] &= np.uint16(0xBFFF)
    y = fmt.dequantize(raw, (64, fmt.block_size))
    assert np.isfinite(y).all()
    assert_same_bits(y, reference_dequantize(fmt, raw, y.shape))


# ---- quantize: formats gguf can quantize, byte for byte --------------------------------------

def _special_blocks(bs: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(bs)
    normal = rng.standard_normal((8, 2 * bs)).astype(np.float32)
    const = np.full((4, 2 * bs), 0.37, np.float32)
    const[1], const[2], const[3] = -3.0, 1e-8, -65504.0
    ties = (rng.integers(-16, 17, (16, 2 * bs)) * 0.5).astype(np.float32)
    ties[:, 0] = 8.0      # pins the scale so that many x / d land exactly on .5
    ties[:8, 1] = -8.0
    quarter = (rng.integers(-64, 65, (16, 2 * bs)) * 0.25).astype(np.float32)
    mixed = normal.copy()
    mixed[0, :bs] = 0                                   # one zero block next to a live one
    mixed[1, 3] = mixed[1, 4] = 2.5                     # equal maxima
    mixed[2, 5], mixed[2, 6] = 2.5, -2.5                # equal magnitudes, opposite signs
    odd = normal.copy()
    odd[0, 1], odd[1, 2], odd[2, 3] = np.inf, -np.inf, np.nan
    odd[3, :bs] = np.inf
    odd[4, 0], odd[4, 1] = 3e38, -3e38                  # max - min overflows float32
    return {
        "normal": normal,
        "zeros": np.zeros((4, 2 * bs), np.float32),
        "negative_zeros": np.full((2, bs), -0.0, np.float32),
        "constant": const,
        "huge": normal * np.float32(1e30),
        "half_overflow": normal * np.float32(3e6),      # scale beyond the largest half
        "small": normal * np.float32(1e-30),
        "subnormal_scale": normal * np.float32(1e-38),
        "denormal_inputs": normal * np.float32(1e-44),
        "ties_half": ties,
        "ties_quarter": quarter,
        "mixed": mixed,
        "non_finite": odd,
    }


@pytest.mark.parametrize("name", GGUF_QUANTIZES)
@pytest.mark.parametrize("case", list(_special_blocks(32)))
def test_quantize_matches_gguf(name, case):
    fmt = formats.get(name)
    x = _special_blocks(fmt.block_size)[case]
    assert_same_bytes(fmt.quantize(x), reference_quantize(fmt, x), fmt.type_size)


@pytest.mark.parametrize("name", GGUF_QUANTIZES)
@pytest.mark.parametrize("rows", [(), (7,), (2, 3), (300,)])
def test_quantize_matches_gguf_shapes(name, rows):
    fmt = formats.get(name)
    shape = rows + (fmt.block_size * (len(rows) + 1),)
    x = np.random.default_rng(len(shape)).standard_normal(shape).astype(np.float32)
    ours = fmt.quantize(x)
    assert ours.size == fmt.nbytes(shape)
    assert_same_bytes(ours, reference_quantize(fmt, x), fmt.type_size)
    assert_same_bits(fmt.dequantize(ours, shape), reference_dequantize(fmt, ours, shape))


any_float32 = st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(GGUF_QUANTIZES), st.data())
def test_quantize_matches_gguf_on_any_float32(name, data):
    fmt = formats.get(name)
    x = data.draw(hnp.arrays(np.float32, st.tuples(st.integers(1, 3), st.just(fmt.block_size)), elements=any_float32))
    assert_same_bytes(fmt.quantize(x), reference_quantize(fmt, x), fmt.type_size)


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 8), st.just(32)),
                  elements=st.floats(-1e6, 1e6, width=32, allow_subnormal=True)))
def test_q8_0_round_trip_error_bound(x):
    """Each value comes back within half a step, plus what rounding the scale to a half costs
    across the 127 steps (relative 2**-11, or 2**-25 absolute once the half is subnormal)."""
    fmt = formats.get("q8_0")
    y = fmt.dequantize(fmt.quantize(x), x.shape)
    d = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)
    bound = 0.5 * d + 127 * np.maximum(d * 2.0 ** -11, 2.0 ** -25) + 1e-12
    assert np.all(np.abs(y.astype(np.float64) - x) <= bound)


# ---- quantize: K-quants (gguf reads them; kiln writes them) --------------------------------

RMSE_BOUND = {  # relative RMSE on standard normal data: measured, plus about 5%
    "q2_k": 0.31, "q3_k": 0.16, "q4_k": 0.075, "q5_k": 0.038, "q6_k": 0.0185,
    "q8_0": 0.0057, "q4_0": 0.09, "q4_1": 0.082, "q5_0": 0.045, "q5_1": 0.04,
    "mxfp4": 0.12,
    "tq1_0": 0.85, "tq2_0": 0.85,  # absmax ternary is for ternary-trained weights, not these
}


@pytest.fixture(scope="module")
def normal_matrix():
    return np.random.default_rng(0).standard_normal((64, 1536)).astype(np.float32)


@pytest.mark.parametrize("name", GGUF_QUANTIZES + K_QUANTS)
def test_round_trip_error(name, normal_matrix):
    fmt = formats.get(name)
    err = rel_rmse(normal_matrix, fmt.dequantize(fmt.quantize(normal_matrix), normal_matrix.shape))
    assert err < RMSE_BOUND[name]


def test_more_bits_less_error(normal_matrix):
    err = {n: rel_rmse(normal_matrix, formats.get(n).dequantize(formats.get(n).quantize(normal_matrix), normal_matrix.shape))
           for n in GGUF_QUANTIZES + K_QUANTS}
    assert err["q2_k"] > err["q3_k"] > err["q4_k"] > err["q5_k"] > err["q6_k"] > err["q8_0"]
    # the K-quants' searched scales beat the plain min/max blocks of the same width
    assert err["q4_k"] < err["q4_1"] < err["q4_0"]
    assert err["q5_k"] < err["q5_1"] < err["q5_0"]


@pytest.mark.parametrize("name", K_QUANTS)
@pytest.mark.parametrize("shape", [(256,), (5, 512), (2, 3, 768)])
def test_k_quant_output_reads_back_in_gguf(name, shape):
    fmt = formats.get(name)
    rng = np.random.default_rng(len(shape))
    x = (rng.standard_t(4, shape) * 0.05).astype(np.float32)
    raw = fmt.quantize(x)
    assert raw.dtype == np.uint8 and raw.size == fmt.nbytes(shape)
    ours = fmt.dequantize(raw, shape)
    assert_same_bits(ours, reference_dequantize(fmt, raw, shape))
    assert np.isfinite(ours).all()
    assert rel_rmse(x, ours) < 2 * RMSE_BOUND[name]


@pytest.mark.parametrize("name", K_QUANTS)
def test_k_quant_deterministic_and_chunk_independent(name, monkeypatch):
    fmt = formats.get(name)
    x = np.random.default_rng(5).standard_normal((24, 512)).astype(np.float32)
    first = fmt.quantize(x)
    assert np.array_equal(first, fmt.quantize(x.copy()))
    from kiln.formats import _blocks
    monkeypatch.setattr(_blocks, "CHUNK_ELEMENTS", 3 * 256)   # forces several uneven chunks
    assert np.array_equal(first, fmt.quantize(x))


@pytest.mark.parametrize("name", K_QUANTS)
@pytest.mark.parametrize("case", ["zeros", "negative_zeros", "constant", "small", "huge", "mixed"])
def test_k_quant_special_blocks(name, case):
    fmt = formats.get(name)
    x = _special_blocks(256)[case]
    raw = fmt.quantize(x)
    y = fmt.dequantize(raw, x.shape)
    assert_same_bits(y, reference_dequantize(fmt, raw, x.shape))
    if case in ("zeros", "negative_zeros", "small"):
        assert not np.any(y)  # scales of 1e-30 are far below the smallest half
    if case in ("constant", "mixed"):
        assert rel_rmse(x, y) < 2 * RMSE_BOUND[name]


# Per K-quant: (symmetric codes?, code steps across the super-block's range, largest sub-block
# scale code, largest min code). A super-block of 256 values spans amax over 2**(b-1) steps
# (q3_k, q6_k: signed codes) or max(x, 0) - min(x, 0) over 2**b - 1 steps (the others: unsigned
# codes and a min that is never positive).
K_STEPS = {"q2_k": (False, 3, 15, 15), "q3_k": (True, 4, 32, 0), "q4_k": (False, 15, 63, 63),
           "q5_k": (False, 31, 63, 63), "q6_k": (True, 32, 128, 0)}
# Worst |y - x| in those steps, measured over 2 000 normal, heavy-tailed, offset, sparse, outlier
# and integer super-blocks plus 1 500 drawings of this test's strategy per format: q2_k 0.91,
# q3_k 1.13, q4_k 0.74, q5_k 0.88, q6_k 0.63. Rounding alone costs half a step; the rest is the
# 4-8 bit rounding of the sub-block scales and clamping. Bounds: about 1.4x those.
K_STEP_BOUND = {"q2_k": 1.25, "q3_k": 1.5, "q4_k": 1.0, "q5_k": 1.25, "q6_k": 1.0}


def k_quant_error_bound(name: str, x: np.ndarray) -> np.ndarray:
    """Per super-block (row of 256), the largest error allowed: K_STEP_BOUND steps, plus what
    a half-precision super-block scale costs once it is subnormal (2**-25 absolute, times the
    largest code products)."""
    symmetric, steps, scale_codes, min_codes = K_STEPS[name]
    x = x.astype(np.float64)
    span = np.abs(x).max(axis=1) if symmetric else np.maximum(x.max(axis=1), 0) - np.minimum(x.min(axis=1), 0)
    return K_STEP_BOUND[name] * span / steps + 2.0 ** -25 * (scale_codes * steps + min_codes)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(K_QUANTS), hnp.arrays(np.float32, st.tuples(st.integers(1, 3), st.just(256)),
                                               elements=st.floats(-1e4, 1e4, width=32, allow_subnormal=True)))
def test_k_quant_any_finite_data_reads_back(name, x):
    fmt = formats.get(name)
    raw = fmt.quantize(x)
    y = fmt.dequantize(raw, x.shape)
    assert_same_bits(y, reference_dequantize(fmt, raw, x.shape))
    assert np.isfinite(y).all()
    err = np.abs(y.astype(np.float64) - x).max(axis=1)
    assert np.all(err <= k_quant_error_bound(name, x)), (err, k_quant_error_bound(name, x))


@pytest.mark.parametrize("name", K_QUANTS)
def test_k_quant_error_within_its_steps(name):
    """The bound of test_k_quant_any_finite_data_reads_back on the shapes that reach it."""
    rng = np.random.default_rng(11)
    offset = rng.standard_normal((64, 256)) + 50                 # all positive: the min is pinned at 0
    outliers = rng.standard_normal((64, 256))
    outliers[:, ::16] *= 1000                                    # one large value per sub-block
    sparse = np.zeros((64, 256))
    sparse[np.arange(64), rng.integers(0, 256, 64)] = rng.standard_normal(64) * 100
    for x in (rng.standard_normal((64, 256)), rng.standard_t(2, (64, 256)), offset, outliers, sparse,
              rng.integers(-3, 4, (64, 256)).astype(float)):
        x = x.astype(np.float32)
        fmt = formats.get(name)
        err = np.abs(fmt.dequantize(fmt.quantize(x), x.shape).astype(np.float64) - x).max(axis=1)
        assert np.all(err <= k_quant_error_bound(name, x))


@pytest.mark.parametrize("name", ALL)
def test_empty_tensors(name):
    fmt = formats.get(name)
    assert fmt.dequantize(np.zeros(0, np.uint8), (0, fmt.block_size)).shape == (0, fmt.block_size)
    if name not in READ_ONLY:
        assert fmt.quantize(np.zeros((0, fmt.block_size), np.float32)).size == 0


@pytest.mark.parametrize("name", K_QUANTS)
def test_k_quant_survives_non_finite_input(name):
    fmt = formats.get(name)
    x = _special_blocks(256)["non_finite"]
    assert fmt.quantize(x).size == fmt.nbytes(x.shape)


@pytest.mark.parametrize("name", ["tq1_0", "tq2_0"])
def test_ternary_weights_round_trip_exactly(name):
    fmt = formats.get(name)
    x = (np.random.default_rng(3).integers(-1, 2, (6, 512)) * 0.375).astype(np.float32)
    x[:, 0] = 0.375  # every block holds its scale
    assert np.array_equal(fmt.dequantize(fmt.quantize(x), x.shape), x)


@pytest.mark.parametrize("name", READ_ONLY)
def test_read_only_formats_say_so(name):
    with pytest.raises(NotImplementedError, match=name):
        formats.get(name).quantize(np.zeros((1, 256), np.float32))


def test_weight_roundtrip_through_formats():
    x = np.random.default_rng(9).standard_normal((4, 512)).astype(np.float32)
    for name in GGUF_QUANTIZES + K_QUANTS:
        w = Weight.from_array(x, name, name="w")
        assert w.raw().shape == (4, formats.get(name).nbytes((512,)))
        assert rel_rmse(x, w.numpy()) < 2 * RMSE_BOUND[name]


def test_rejects_partial_blocks():
    with pytest.raises(ValueError):
        formats.get("q4_k").quantize(np.zeros((2, 300), np.float32))


def test_registry_is_complete_whichever_format_module_is_imported_first():
    # a format module imported on its own used to leave the registry holding only itself
    import subprocess
    import sys
    code = ("import kiln.formats.q3_k\nfrom kiln import formats\n"
            "print(formats.get('q8_0').name, len(formats.all_formats()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    name, count = out.stdout.split()
    assert name == "q8_0" and int(count) > 20
