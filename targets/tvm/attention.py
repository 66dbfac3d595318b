"""The KV cache and attention kernels of the TVM backend, written as TIR.

The cache of a layer is two buffers ``[batch, kv_heads, capacity, head_dim]`` that the session
allocates once and passes to every call; ``kv_append`` writes a step's new keys and values
into them in place (Relax ``call_tir_inplace``), at each row's own cached length, and
``attention`` reads them back. Nothing is copied past -> present.

``attention`` computes causal grouped-query attention for query i of row b (absolute position
``lengths[b] + i``) over keys ``0 .. lengths[b] + i`` (and only the last ``window`` of them
for sliding-window models), with the softmax computed online (running maximum and sum, as
flash attention does), so no score buffer of the context's length is needed. The order of
the float32 additions differs from the interpreter's softmax-then-matmul by rounding only.

Each kernel comes in two schedules: CPU (a parallel loop over (row, head, query), 16-lane
vectors over the head dimension) and GPU (a thread block per (row, head, query), a thread
per head-dimension element, the dot product reduced in shared memory).
"""
from __future__ import annotations

import math

from tvm.script import tirx as T

LANES = 16


def kv_append(kv_heads: int, head_dim: int, gpu: bool, cache_dtype: str = "float32"):
    """(k_cache, v_cache, k [b, KV, s, D], v, lengths int32 [b]) -> the caches, written in place
    (rounded to float16 for a float16 cache)."""
    KV, D, CD = kv_heads, head_dim, cache_dtype

    if gpu:
        @T.prim_func(private=True)
        def kv_append_gpu(kc_h: T.handle, vc_h: T.handle, k_h: T.handle, v_h: T.handle, len_h: T.handle):
            T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
            b, s, cap = T.int64(), T.int64(), T.int64()
            KC = T.match_buffer(kc_h, (b, KV, cap, D), CD, offset_factor=1)
            VC = T.match_buffer(vc_h, (b, KV, cap, D), CD, offset_factor=1)
            K = T.match_buffer(k_h, (b, KV, s, D), "float32")
            V = T.match_buffer(v_h, (b, KV, s, D), "float32")
            L = T.match_buffer(len_h, (b,), "int32")
            bx = T.launch_thread("blockIdx.x", b * KV * s)
            tx = T.launch_thread("threadIdx.x", D)
            r = bx // (KV * s)
            h = bx // s % KV
            i = bx % s
            KC[r, h, T.Cast("int64", L[r]) + i, tx] = T.Cast(CD, K[r, h, i, tx])
            VC[r, h, T.Cast("int64", L[r]) + i, tx] = T.Cast(CD, V[r, h, i, tx])
        return kv_append_gpu

    @T.prim_func(private=True)
    def kv_append_cpu(kc_h: T.handle, vc_h: T.handle, k_h: T.handle, v_h: T.handle, len_h: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        b, s, cap = T.int64(), T.int64(), T.int64()
        KC = T.match_buffer(kc_h, (b, KV, cap, D), CD, offset_factor=1)
        VC = T.match_buffer(vc_h, (b, KV, cap, D), CD, offset_factor=1)
        K = T.match_buffer(k_h, (b, KV, s, D), "float32")
        V = T.match_buffer(v_h, (b, KV, s, D), "float32")
        L = T.match_buffer(len_h, (b,), "int32")
        for r in range(b):
            for h in range(KV):
                for i in range(s):
                    for d in T.vectorized(D):
                        KC[r, h, T.Cast("int64", L[r]) + i, d] = T.Cast(CD, K[r, h, i, d])
                        VC[r, h, T.Cast("int64", L[r]) + i, d] = T.Cast(CD, V[r, h, i, d])
    return kv_append_cpu


def attention(heads: int, kv_heads: int, head_dim: int, scale: float, window: int, softcap: float = 0.0,
              sinks: bool = False, *, gpu: bool, cache_dtype: str = "float32"):
    """(q [b, H, s, D], k_cache, v_cache, lengths int32 [b], sinks [H]) -> out [b, s, H*D]; a
    float16 cache is widened to float32 as it is read. ``softcap`` c > 0: each scaled score s
    becomes c·tanh(s / c) (gemma2), divided as transformers divides. With ``sinks`` (gpt-oss)
    the online softmax starts from head h's sink, a key of logit sinks[h] and no value (running
    maximum sinks[h], sum 1), so e^sink joins the denominator; without, the sinks input is
    not read."""
    H, KV, D, CD = heads, kv_heads, head_dim, cache_dtype
    group = H // KV
    scale = float(scale)
    softcap = float(softcap)

    def capped(score):
        return T.tanh(score / T.float32(softcap)) * T.float32(softcap) if softcap else score
    window = int(window)
    windowed = window > 0
    lanes = LANES if D % LANES == 0 else 1
    tree = lanes == LANES
    neg = -3.4028234663852886e38

    if gpu:
        steps = int(math.log2(D)) if D & (D - 1) == 0 else 0
        if not steps:
            raise ValueError(f"the GPU attention kernel needs a power-of-two head size, not {D}")

        @T.prim_func(private=True)
        def attention_gpu(q_h: T.handle, kc_h: T.handle, vc_h: T.handle, len_h: T.handle, s_h: T.handle,
                          o_h: T.handle):
            T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
            b, s, cap = T.int64(), T.int64(), T.int64()
            Q = T.match_buffer(q_h, (b, H, s, D), "float32")
            KC = T.match_buffer(kc_h, (b, KV, cap, D), CD, offset_factor=1)
            VC = T.match_buffer(vc_h, (b, KV, cap, D), CD, offset_factor=1)
            L = T.match_buffer(len_h, (b,), "int32")
            S = T.match_buffer(s_h, (H,), "float32")
            O = T.match_buffer(o_h, (b, s, H * D), "float32")
            bx = T.launch_thread("blockIdx.x", b * H * s)
            tx = T.launch_thread("threadIdx.x", D)
            red = T.alloc_buffer((D,), "float32", scope="shared")
            st = T.alloc_buffer((3,), "float32", scope="local")     # running max, sum, accumulator
            r = bx // (H * s)
            h = bx // s % H
            i = bx % s
            pos = T.Cast("int64", L[r]) + i
            start = T.max(pos - window + 1, T.int64(0)) if windowed else T.int64(0)
            st[0] = S[h] if sinks else T.float32(neg)
            st[1] = T.float32(1) if sinks else T.float32(0)
            st[2] = T.float32(0)
            for j in range(start, pos + 1):
                red[tx] = Q[r, h, i, tx] * T.Cast("float32", KC[r, h // group, j, tx])
                T.tvm_storage_sync("shared")
                for p in range(steps):
                    if tx < T.shift_right(D, p + 1):
                        red[tx] = red[tx] + red[tx + T.shift_right(D, p + 1)]
                    T.tvm_storage_sync("shared")
                score = capped(red[0] * T.float32(scale))
                T.tvm_storage_sync("shared")
                m_new = T.max(st[0], score)
                alpha = T.exp(st[0] - m_new)
                p_j = T.exp(score - m_new)
                st[1] = st[1] * alpha + p_j
                st[2] = st[2] * alpha + p_j * T.Cast("float32", VC[r, h // group, j, tx])
                st[0] = m_new
            O[r, i, h * D + tx] = st[2] / st[1]
        return attention_gpu

    @T.prim_func(private=True)
    def attention_cpu(q_h: T.handle, kc_h: T.handle, vc_h: T.handle, len_h: T.handle, s_h: T.handle,
                      o_h: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        b, s, cap = T.int64(), T.int64(), T.int64()
        Q = T.match_buffer(q_h, (b, H, s, D), "float32")
        KC = T.match_buffer(kc_h, (b, KV, cap, D), CD, offset_factor=1)
        VC = T.match_buffer(vc_h, (b, KV, cap, D), CD, offset_factor=1)
        L = T.match_buffer(len_h, (b,), "int32")
        S = T.match_buffer(s_h, (H,), "float32")
        O = T.match_buffer(o_h, (b, s, H * D), "float32")
        for task in T.parallel(b * H * s):
            # default scope: on the CPU, "local" buffers come from the workspace allocator,
            # one allocation per task; these small ones belong on the stack
            acc = T.alloc_buffer((D,), "float32")
            part = T.alloc_buffer((LANES,), "float32")
            st = T.alloc_buffer((3,), "float32")    # running max, sum, score
            r = task // (H * s)
            h = task // s % H
            i = task % s
            pos = T.Cast("int64", L[r]) + i
            start = T.max(pos - window + 1, T.int64(0)) if windowed else T.int64(0)
            st[0] = S[h] if sinks else T.float32(neg)
            st[1] = T.float32(1) if sinks else T.float32(0)
            for d in T.vectorized(D):
                acc[d] = T.float32(0)
            for j in range(start, pos + 1):
                for l in T.vectorized(lanes):
                    part[l] = T.float32(0)
                for c in range(D // lanes):
                    for l in T.vectorized(lanes):
                        part[l] = part[l] + Q[r, h, i, c * lanes + l] * T.Cast("float32", KC[r, h // group, j, c * lanes + l])
                if tree:
                    # halving adds: a chain of 4 dependent adds instead of 16
                    for l in T.vectorized(8):
                        part[l] = part[l] + part[l + 8]
                    for l in T.vectorized(4):
                        part[l] = part[l] + part[l + 4]
                    st[2] = (part[0] + part[2]) + (part[1] + part[3])
                else:
                    st[2] = T.float32(0)
                    for l in range(lanes):
                        st[2] = st[2] + part[l]
                st[2] = capped(st[2] * T.float32(scale))
                if st[2] > st[0]:
                    # a new maximum: rescale what was summed so far
                    st[1] = st[1] * T.exp(st[0] - st[2])
                    for d in T.vectorized(D):
                        acc[d] = acc[d] * T.exp(st[0] - st[2])
                    st[0] = st[2]
                st[2] = T.exp(st[2] - st[0])
                st[1] = st[1] + st[2]
                for d in T.vectorized(D):
                    acc[d] = acc[d] + st[2] * T.Cast("float32", VC[r, h // group, j, d])
            for d in T.vectorized(D):
                O[r, i, h * D + d] = acc[d] / st[1]
    return attention_cpu
