"""The pipeline as one readable function per user verb: read, rewrite, lower, package."""
from __future__ import annotations

import glob
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable

from . import __version__
from .artifact import write_manifest
from .atomic import kill_point, refuse_existing, refuse_foreign, staging
from .errors import KilnError
from .passes_base import PassRecord, run_passes

Report = Callable[[str], None]


def load_model(path):
    """Any supported model -> ModelIR."""
    from kiln.frontends.detect import read_model
    return read_model(path)


def pipeline(backend: str) -> list:
    """The flat, named list of passes for a backend."""
    from kiln.passes.attention import fuse_attention
    from kiln.passes.dce import dce
    from kiln.passes.kv_cache import insert_kv_cache
    from kiln.passes.merge_matmul import merge_matmul
    from kiln.passes.quant_matmul import fuse_quant_matmul
    from kiln.passes.rmsnorm import fuse_rmsnorm
    from kiln.passes.rotary import fuse_rotary
    from kiln.passes.skip_rmsnorm import fuse_skip_rmsnorm
    from kiln.passes.moe import decompose as decompose_moe
    from kiln.targets import fusions
    can = fusions.of(backend)
    # without an MoE kernel every expert runs, densely weighted; after the attention fusion,
    # which would take the router's softmax for a candidate
    experts = [] if can.moe else [("moe", decompose_moe)]
    return [("kv_cache", insert_kv_cache),
            ("rmsnorm", fuse_rmsnorm),
            ("skip_rmsnorm", fuse_skip_rmsnorm),
            ("rotary", fuse_rotary),
            ("attention", lambda g: fuse_attention(g, head_dim_multiple=can.attention_head_multiple)),
            *experts,
            # q/k/v and gate/up as one product each, before quant_matmul makes them one
            # MatMulNBits (and one min-term correction); the attention lowering still finds each
            # projection's head split below the Split
            ("merge_matmul", merge_matmul),
            ("quant_matmul", lambda g: fuse_quant_matmul(g, can.quant_matmul)),
            ("dce", dce)]


def source_digest(path) -> str:
    """sha256 of a model file, or of a folder's files in name order."""
    p = Path(path)
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())
    for f in files:
        if p.is_dir():
            h.update(f.relative_to(p).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def quant_scheme(quant: str):
    """A --quant name as a scheme (block type or llama.cpp mixture), or a one-line error."""
    from kiln import quant_schemes
    try:
        return quant_schemes.get(quant)
    except ValueError as e:
        raise KilnError(None, str(e)) from None


def refuse_requantize(model, quant: str, requantize: bool, path=None) -> None:
    """--quant on a model whose weights are already blocks: an error unless asked for."""
    blocks = sorted({w.format.name for w in model.weights.values() if w.format.is_block})
    packed = model.source.get("quantization")
    if packed:      # a GPTQ/AWQ checkpoint: quantized even where kiln holds a layer as float
        blocks = [f"{packed['method'].upper()} int4", *blocks]
    if blocks and not requantize:
        raise KilnError(path or model.source.get("path"),
                        f"is already quantized ({', '.join(blocks)}); --quant {quant} would quantize its weights "
                        f"a second time and lose precision twice (leave out --quant to keep its blocks, "
                        f"or add --requantize)")


def compile(model, target: str = "cpu", output=None, *, verify: bool = False, dump_ir: str | None = None,
            on_pass: Callable[[PassRecord], None] | None = None, on_weight: Report | None = None,
            on_stage: Report | None = None, kv_layout: str = "auto", quant: str | None = None,
            requantize: bool = False, precision: str = "exact", backend: str | None = None,
            arch: str | None = None, kv_dtype: str = "f32", force: bool = False,
            lora: list[tuple[str, float]] | None = None, sign=None, on_notice: Report | None = None,
            imatrix=None):
    """Compile a model (path or ModelIR) for ``target`` into the artifact folder ``output``.

    ``quant`` quantizes a float model's weights first: a block type or a llama.cpp mixture
    (``kiln.quant_schemes``); an already-quantized model is refused unless ``requantize``.

    ``precision``: "exact" (products in float32, equal to the interpreter to float32 rounding)
    or "fast" (int8 activations in quantized matmuls, as llama.cpp computes).

    ``kv_layout``: "auto" (the preallocated, in-place KV cache wherever it computes the same
    thing as the graph, else the growing one), "shared" or "concat" to insist on one (ONNX
    Runtime backend; TVM lays out its own cache).

    ``backend``: "tvm" or "onnxrt" (default: TVM, which every target has; where TVM is not
    installed the default falls back to ONNX Runtime and ``on_notice`` (else a warning) says so);
    ``arch`` picks a CUDA architecture (sm80, sm86, sm89, sm90) for the cuda target.
    ``kv_dtype``: "f32" or "f16" (TVM backend: the KV cache in float16, half the memory
    traffic of long contexts; ONNX Runtime artifacts keep float32).
    ``lora``: ``(adapter path, scale)`` pairs merged into the weights first
    (:mod:`kiln.frontends.lora`).
    ``force``: replace whatever is at ``output`` (an earlier artifact is replaced without it);
    a folder holding files that are not an earlier artifact's is refused either way.
    ``sign``: an Ed25519 private key file (PEM); the artifact then carries a signature of its
    manifest (``manifest.sig``, see ``kiln.signing``), written before it is moved into place.
    ``imatrix``: an importance matrix file (``kiln imatrix``, llama-imatrix) that weights the
    quantizers' error, as llama-quantize --imatrix does."""
    from kiln.targets.presets import choose_backend, resolve
    t0 = time.perf_counter()
    stage = on_stage or (lambda s: None)
    asked_backend = backend
    try:
        preset = resolve(target, arch)
        backend, fallback = choose_backend(preset, backend)
    except ValueError as e:
        raise KilnError(None, str(e)) from None
    if arch is not None and preset.device != "cuda":
        # the presets resolve "cpu" before looking at --arch: refuse it here rather than drop it
        raise KilnError(None, f"--arch {arch} is a CUDA architecture; target {target!r} is a {preset.device} "
                              "target (use --target cuda --arch ..., or leave out --arch)")
    if fallback is not None and not _is_embedder_source(model):
        (on_notice or _warn)(fallback)
    if kv_layout != "auto" and backend != "onnxrt":
        raise KilnError(None, f"kv_layout={kv_layout!r} is an ONNX Runtime option, for backend='onnxrt'; "
                              f"the {backend} backend lays out its own cache")
    if precision not in ("exact", "fast"):
        raise KilnError(None, f"unknown precision {precision!r}; choose exact or fast")
    if kv_dtype not in ("f32", "f16"):
        raise KilnError(None, f"unknown KV-cache type {kv_dtype!r}; choose f32 or f16")
    if kv_dtype == "f16" and backend != "tvm":
        raise KilnError(None, "--kv-dtype f16 needs --backend tvm (the ONNX Runtime backend keeps a float32 cache)")
    scheme = quant_scheme(quant) if quant else None
    if sign is not None:                    # a bad key is refused before the work, not after
        from kiln.signing import load_private_key
        sign = load_private_key(sign)
    if imatrix is not None and scheme is None:
        raise KilnError(imatrix, "--imatrix weights the quantizers: it needs --quant")
    src_path = None
    if isinstance(model, (str, os.PathLike)):
        from kiln.frontends.detect import resolve_path
        src_path = resolve_path(model)
        model = src_path
        stage("reading model")
        model = load_model(model)
    if model.embedding is not None:
        backend = _embedder_backend(model, asked_backend, preset, scheme, lora, src_path)
    if lora:
        from kiln.frontends.lora import apply_adapters
        stage("merging LoRA adapters")
        model = apply_adapters(model, lora)
    if output is None:
        from kiln.frontends.hub import cached_name
        source = model.source.get("path") or "model"
        name = cached_name(source) or Path(source).name.split(".")[0] or "model"
        output = f"{name}.kiln"
    owned = _artifact_files(output)
    refuse_foreign(output, owned, "an artifact")          # before the work, not after it
    # an earlier artifact is a build output kiln wrote whole: compiling again replaces it, as a
    # compiler replaces its binary; anything else at the destination needs --force
    if not owned:
        refuse_existing(output, force)
    passes = pipeline(backend) if model.embedding is None else EMBEDDING_PIPELINE
    if scheme is not None:
        from kiln.frontends.arch import FAMILIES
        from kiln.passes.quantize import quantize_pass
        from kiln.quant_schemes import Layout
        refuse_requantize(model, quant, requantize, src_path)
        layout = Layout.of(model.config, FAMILIES[model.config["family"]])
        importance = _importance_by_role(imatrix, model) if imatrix is not None else None
        passes = [("quantize", quantize_pass(scheme, layout, requantize=requantize, importance=importance))] + passes
    stage("running passes")
    graph = model.graph
    if scheme is not None:          # requantized: a GPTQ desc_act layer's values in their own order
        from kiln.frontends.packed_int4 import in_checkpoint_order
        graph = in_checkpoint_order(model)
    graph, records = run_passes(graph, passes, verify=verify, dump_dir=dump_ir, report=on_pass)
    cfg = model.config
    with staging(output, owned=lambda: _artifact_files(output), keep_others=False, kind="an artifact") as tmp:
        def weight_done(name):
            kill_point("weight")
            if on_weight is not None:
                on_weight(name)
        if backend == "tvm":
            entry = _lower_tvm(graph, tmp, preset, cfg, weight_done, stage, precision, kv_dtype,
                               plain=model.embedding is not None)
        else:
            from kiln.targets.onnxrt import build
            stage("lowering to ONNX")
            entry = build.build(graph, tmp, preset, cfg, progress=weight_done, kv_layout=kv_layout, precision=precision)
        if model.tokenizer is not None:
            model.tokenizer.save(tmp / "tokenizer")
            # the runtime tokenizer reads end-of-sequence ids from here too
            (tmp / "tokenizer" / "generation_config.json").write_text(json.dumps(model.generation, indent=2))
        stage("writing manifest")
        manifest = {
            "kiln_version": __version__,
            "source": {"format": model.source.get("format"), "path": os.fspath(src_path or model.source.get("path", "")),
                       "sha256": source_digest(src_path) if src_path else None,
                       **({"tensor_formats": model.source["tensor_formats"]} if "tensor_formats" in model.source else {}),
                       **({"lora": model.source["lora"]} if "lora" in model.source else {}),
                       **({"quantization": model.source["quantization"]} if "quantization" in model.source else {})},
            "architecture": cfg["family"],
            "config": cfg,
            "target": {"preset": preset.name, "device": preset.device, "isa": preset.isa},
            "backend": entry.manifest(),
            "quantization": graph.meta.get("quantization"),
            "precision": precision,
            "passes": [{"name": r.name, "changed": r.changed, "stats": r.stats, "seconds": round(r.seconds, 4)} for r in records],
            "generation": model.generation,
            "tokenizer": "tokenizer" if model.tokenizer is not None else None,
            "chat_template": getattr(model.tokenizer, "chat_template", None) is not None,
            "compile_seconds": round(time.perf_counter() - t0, 2),
        }
        if model.embedding is not None:
            manifest["embedding"] = model.embedding
        write_manifest(tmp, manifest)
        if sign is not None:
            from kiln.signing import sign as sign_manifest
            sign_manifest(tmp, sign)
    return Path(output)


def _dce(g):
    from kiln.passes.dce import dce
    return dce(g)


#: An embedding model's graph runs once over whole inputs: no KV cache, and so none of the
#: decoder fusions, which rewrite the attention around that cache
EMBEDDING_PIPELINE = [("dce", _dce)]


def _is_embedder_source(model) -> bool:
    """Whether ``model`` (a path, before it is read) is a sentence-transformers folder: the
    backend an embedder gets does not depend on TVM, so TVM's absence is no news for it."""
    from kiln.frontends.sentence_transformers import is_sentence_transformers
    return isinstance(model, (str, os.PathLike)) and is_sentence_transformers(model)


def _embedder_backend(model, asked: str | None, preset, scheme, lora, path) -> str:
    """ONNX Runtime unless TVM is asked for (an embedder's TVM build takes seconds for a small
    gain on one pass over the inputs); what an embedder cannot have yet is refused in one line."""
    where = path or model.source.get("path")
    if scheme is not None or lora:
        raise KilnError(where, f"is an embedding model; {'--quant' if scheme is not None else '--lora'} is for "
                               f"decoder language models (embedders compile with their float weights)")
    if asked == "tvm":
        return "tvm"
    if "onnxrt" not in preset.backends:
        raise KilnError(where, f"is an embedding model, which kiln compiles with ONNX Runtime unless "
                               f"--backend tvm is given; target {preset.name!r} has no ONNX Runtime backend")
    return "onnxrt"


def _artifact_files(folder) -> list[str]:
    """The files of an earlier artifact at ``folder``, as its manifest lists them (read
    leniently: a damaged artifact may still be replaced); none where there is no artifact."""
    from .artifact import MANIFEST
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    files = manifest.get("files") if isinstance(manifest, dict) and "kiln_version" in manifest else None
    if not isinstance(files, dict):
        return []
    # escaped: each name is a pattern that matches only itself
    return [MANIFEST, *(glob.escape(name) for name in files if isinstance(name, str))]


def _importance_by_role(path, model) -> dict:
    """An importance matrix's weights keyed by the graph's roles (it names GGUF tensors)."""
    from kiln.frontends.arch import FAMILIES
    from kiln.imatrix import gguf_name, load_for_quantizing
    family = FAMILIES[model.config["family"]]
    names = {role: gguf_name(role, family) for role in model.graph.weights}
    shapes = {n: model.graph.weights[r].weight.shape[-1] for r, n in names.items() if n}
    im = load_for_quantizing(path, shapes)
    out = {}
    for role, n in names.items():
        imp = im.importance(n) if n else None
        if imp is not None:
            out[role] = imp
    return out


def _warn(notice: str) -> None:
    import warnings
    warnings.warn(notice, stacklevel=3)      # points at the caller of compile()


class PlainEntry:
    """An embedder's TVM entry: the dict its session reads, as written (no KV cache to type)."""

    def __init__(self, fields: dict):
        self.fields = fields

    def manifest(self) -> dict:
        return self.fields


def _lower_tvm(graph, tmp, preset, cfg, weight_done, stage, precision, kv_dtype, plain: bool = False):
    """``plain``: a graph without a KV cache (an embedder's), as one entry point ``main``."""
    from kiln.targets.presets import TVM_MISSING
    try:
        import tvm  # noqa: F401   found by choose_backend, but an installation can be broken
    except ImportError:
        raise KilnError(None, TVM_MISSING) from None
    from kiln.targets.tvm import build
    try:
        if plain:
            return PlainEntry(build.build_plain(graph, tmp, preset, progress=weight_done, stage=stage,
                                                precision=precision))
        return build.build(graph, tmp, preset, cfg, progress=weight_done, stage=stage, precision=precision,
                           kv_dtype={"f32": "float32", "f16": "float16"}[kv_dtype])
    except ValueError as e:
        raise KilnError(None, f"the TVM backend cannot compile this model: {e}") from None


WRITERS = {"hf": "kiln.frontends.hf", "gguf": "kiln.frontends.gguf",
           "safetensors": "kiln.frontends.safetensors_model", "onnx": "kiln.frontends.onnx"}


def convert(src, dst, *, to: str, dtype: str | None = None, quant: str | None = None,
            max_shard_bytes: int | None = None, console=None, quiet: bool = True, requantize: bool = False,
            force: bool = False, lora: list[tuple[str, float]] | None = None, base=None,
            onnx_layout: str = "optimum", imatrix=None) -> dict:
    """Convert a model between formats, streaming tensor by tensor from the source.

    ``quant`` (GGUF output) is a block type or a llama.cpp mixture; a source that is already
    quantized is refused unless ``requantize``. An existing ``dst`` is refused unless
    ``force``; a folder output then replaces only the files its writer owns. ``lora``:
    ``(adapter, scale)`` pairs merged into the output. ``base``: ``src`` is a LoRA adapter,
    written as llama.cpp's LoRA GGUF for that base model. ``onnx_layout`` (ONNX output):
    "optimum" (optimum's decoder inputs and outputs) or "kiln" (kiln's, with logits_positions)."""
    import importlib

    from .progress import advance, write_progress
    if to not in WRITERS:
        raise KilnError(dst, f"unknown output format {to!r} (choose from {', '.join(WRITERS)})")
    if quant and to != "gguf":
        raise KilnError(dst, f"--quant is for GGUF output; {to} holds f32, f16 or bf16 tensors (use --dtype)")
    if quant:
        quant = quant_scheme(quant).name
    refuse_existing(dst, force)
    if imatrix is not None and not quant:
        raise KilnError(imatrix, "--imatrix weights the quantizers: it needs --quant")
    t0 = time.perf_counter()
    if base is not None:
        if to != "gguf" or quant or lora:
            raise KilnError(dst, "--base converts a LoRA adapter to llama.cpp's LoRA GGUF: use --to gguf "
                                 "(with --dtype f32, f16 or bf16) and no --quant or --lora")
        from kiln.frontends.lora import convert_adapter
        summary = convert_adapter(src, dst, base, dtype=dtype)
        summary["seconds"] = round(time.perf_counter() - t0, 3)
        return summary
    model = load_model(src)
    if model.embedding is not None:
        raise KilnError(src, "is an embedding model; kiln convert writes decoder language models")
    if lora:
        from kiln.frontends.lora import apply_adapters
        model = apply_adapters(model, lora)
    if quant:
        refuse_requantize(model, quant, requantize)
    writer = importlib.import_module(WRITERS[to])
    # an ONNX export writes initializers, not the model's tensors: no total to count towards
    total = None if to == "onnx" else len(model.weights)
    with write_progress(console, unit="tensors", disable=quiet or console is None) as prog:
        task = prog.add_task(f"converting to {to}", total=total, bytes=0)

        def progress(name, nbytes=0):
            kill_point("tensor")
            advance(prog, task, name, nbytes)
        kwargs = {"progress": progress}
        if to == "gguf":
            kwargs.update(dtype=dtype, quant=quant, **({"imatrix": imatrix} if imatrix is not None else {}))
        elif to in ("hf", "safetensors"):
            kwargs.update(dtype=dtype)
        elif to == "onnx":
            kwargs.update(dtype=dtype, layout=onnx_layout)
        if to == "hf" and max_shard_bytes:
            kwargs.update(shard_bytes=max_shard_bytes)
        summary = writer.write(model, dst, **kwargs)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    packed = model.source.get("quantization")
    if to == "gguf" and not quant and not dtype and packed:
        summary.setdefault("notes", []).append(
            f"the {packed['method'].upper()} checkpoint's int4 weights were dequantized to float32, exactly: GGUF has "
            f"no type for 4-bit codes with an integer zero per group; --quant TYPE --requantize quantizes them to "
            f"a GGUF type instead")
    if to in ("hf", "safetensors") and dtype is None and summary.get("dtype") == "f32" and \
            any(w.format.is_block for w in model.weights.values()):
        # a decision, not an accident: dequantized blocks need float32 to stay exact
        summary.setdefault("notes", []).append(
            "the source's quantized blocks became float32, the one float type that holds their values "
            "exactly; --dtype bf16 or f16 halves the size and rounds each weight once")
    return summary
