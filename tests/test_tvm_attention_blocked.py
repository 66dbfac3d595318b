"""The blocked CPU prefill attention (targets/tvm/attention_blocked.py) against a numpy softmax
attention over the same cache: rows at different depths, query counts that are not a multiple
of the block, grouped heads, sliding windows, softcapping, gpt-oss's sinks and a float16 cache
(the decode kernel of attention.py too, with sinks); and its vectorizable exponential against
numpy's."""
import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from kiln.targets.tvm.attention_blocked import attention_prefill_cpu  # noqa: E402


def reference(q, kc, vc, lengths, scale, window, softcap, sinks=None):
    b, h, s, d = q.shape
    group = h // kc.shape[1]
    out = np.zeros((b, s, h * d), np.float64)
    for r in range(b):
        for i in range(s):
            pos = lengths[r] + i
            lo = max(0, pos - window + 1) if window else 0
            for hh in range(h):
                k = kc[r, hh // group, lo:pos + 1].astype(np.float64)
                v = vc[r, hh // group, lo:pos + 1].astype(np.float64)
                sc = k @ q[r, hh, i].astype(np.float64) * scale
                if softcap:
                    sc = np.tanh(sc / softcap) * softcap
                m = sc.max() if sinks is None else max(sc.max(), sinks[hh])
                w = np.exp(sc - m)
                extra = 0.0 if sinks is None else np.exp(sinks[hh] - m)     # the sink: a key with no value
                out[r, i, hh * d:(hh + 1) * d] = w @ v / (w.sum() + extra)
    return out


def run(fn, *arrays, out_shape):
    dev = tvm.cpu()
    lib = tvm.compile(tvm.IRModule({"main": fn.with_attr("global_symbol", "main")}), target="llvm")
    args = [tvm.runtime.tensor(a, dev) for a in arrays] + [tvm.runtime.empty(out_shape, "float32", dev)]
    lib.mod["main"](*args)
    return args[-1].numpy()


def _case(heads, kv_heads, dim, s, cache):
    rng = np.random.default_rng(7)
    lengths = np.array([0, 13, 50], np.int32)             # rows at different depths
    cap = int(lengths.max()) + s
    q = rng.standard_normal((3, heads, s, dim), dtype=np.float32) * 2
    kc = (rng.standard_normal((3, kv_heads, cap, dim)) * 2).astype(cache)
    vc = rng.standard_normal((3, kv_heads, cap, dim)).astype(cache)
    # sinks from far below the scores to far above them (a head whose sink takes most weight)
    sinks = np.linspace(-30.0, 12.0, heads).astype(np.float32)
    return q, kc, vc, lengths, sinks


@pytest.mark.parametrize("heads,kv_heads,dim,s,window,softcap,sinks,cache", [
    (4, 2, 16, 37, 0, 0.0, False, "float32"),       # a partial query block, two heads per kv head
    (2, 2, 32, 1, 0, 0.0, False, "float32"),        # one new token a row
    (4, 1, 16, 40, 9, 0.0, False, "float32"),       # sliding window narrower than a key block
    (2, 1, 64, 20, 0, 5.0, False, "float16"),       # softcap, half-precision cache
    (4, 2, 16, 37, 5, 0.0, True, "float32"),        # gpt-oss: sinks and a sliding window
])
def test_blocked_attention_matches_softmax_attention(heads, kv_heads, dim, s, window, softcap, sinks, cache):
    q, kc, vc, lengths, sink = _case(heads, kv_heads, dim, s, cache)
    scale = dim ** -0.5
    fn = attention_prefill_cpu(heads, kv_heads, dim, scale, window, softcap, sinks, cache_dtype=cache)
    got = run(fn, q, kc, vc, lengths, sink, out_shape=(3, s, heads * dim))
    want = reference(q, kc, vc, lengths, scale, window, softcap, sink if sinks else None)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("sinks", [False, True])
def test_decode_kernel_takes_the_sinks(sinks):
    """attention.py's per-query kernel (decode, and the GPU's schedule of the same online
    softmax) seeded with the sink; without sinks its sinks input is not read (NaNs there)."""
    from kiln.targets.tvm.attention import attention
    q, kc, vc, lengths, sink = _case(4, 2, 16, 3, "float32")
    fn = attention(4, 2, 16, 0.25, 0, 0.0, sinks, gpu=False)
    got = run(fn, q, kc, vc, lengths, sink if sinks else np.full(4, np.nan, np.float32), out_shape=(3, 3, 64))
    want = reference(q, kc, vc, lengths, 0.25, 0, 0.0, sink if sinks else None)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_the_exponential_is_within_two_ulps_for_nonpositive_inputs():
    from tvm.script import tirx as T
    from kiln.targets.tvm.attention_blocked import _exp

    @T.prim_func
    def exp_all(x_h: T.handle, y_h: T.handle):
        n = T.int64()
        X = T.match_buffer(x_h, (n,), "float32")
        Y = T.match_buffer(y_h, (n,), "float32")
        for i in range(n):
            Y[i] = _exp(X[i])

    x = np.concatenate([-np.logspace(-8, np.log10(87), 20000), [0.0, -1e-30]]).astype(np.float32)
    y = run(exp_all, x, out_shape=x.shape)
    want = np.exp(x.astype(np.float64))
    assert (np.abs(y - want) / want).max() < 2.5e-7
