"""``kiln inspect``: what a model file, folder or artifact holds."""
from __future__ import annotations

import json
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from .errors import KilnError


def _tensor_table(tensors: dict) -> Table:
    by_fmt: dict[str, list] = {}
    for w in tensors.values():
        c = by_fmt.setdefault(w.format.name, [0, 0, 0])
        c[0] += 1
        c[1] += w.numel
        c[2] += w.nbytes
    t = Table(title=f"{len(tensors)} tensors")
    for col in ("type", "tensors", "parameters", "bytes"):
        t.add_column(col, justify="right" if col != "type" else "left")
    for fmt, (n, params, nbytes) in sorted(by_fmt.items()):
        t.add_row(fmt, str(n), f"{params:,}", f"{nbytes / 1e6:.1f} MB")
    total = [sum(v[i] for v in by_fmt.values()) for i in range(3)]
    t.add_row("total", str(total[0]), f"{total[1]:,}", f"{total[2] / 1e6:.1f} MB")
    return t


def _config_table(cfg: dict, title: str) -> Table:
    t = Table(title=title)
    t.add_column("key")
    t.add_column("value")
    for k, v in cfg.items():
        if v not in (None, [], {}, False) or k in ("tie_word_embeddings",):
            t.add_row(k, json.dumps(v) if not isinstance(v, str) else v)
    return t


def attention_layers(cfg: dict) -> str | None:
    """Which layers attend within a sliding window, and gpt-oss's sinks, in one line (None:
    neither)."""
    window = cfg.get("sliding_window")
    sinks = "; a learned sink logit per head in every softmax" if cfg.get("attention_sinks") else ""
    if not window:
        return f"attention: every layer global{sinks}" if sinks else None
    types = cfg.get("layer_types") or []
    if not types or all(t == "sliding_attention" for t in types):
        return f"attention: every layer within a sliding window of {window} tokens{sinks}"
    if "sliding_attention" not in types:
        return f"attention: every layer global{sinks}"
    marks = "".join("S" if t == "sliding_attention" else "G" for t in types)
    n = marks.count("S")
    return (f"attention: {n} of {len(types)} layers within a sliding window of {window} tokens (S), the others "
            f"global (G), layer 0 first: {marks}{sinks}")


def experts_line(cfg: dict) -> str | None:
    """A mixture of experts' routing in one line (None: a dense model)."""
    n, k = cfg.get("num_experts") or 0, cfg.get("experts_per_token") or 0
    if not n:
        return None
    per_expert = 3 * int(cfg["hidden_size"]) * int(cfg["expert_intermediate_size"])
    total, active = cfg["num_layers"] * n * per_expert, cfg["num_layers"] * k * per_expert
    shared = cfg.get("shared_expert_intermediate_size") or 0
    glu = f", biased, clamped SwiGLU at {cfg.get('swiglu_limit'):g}" if cfg.get("expert_glu") == "swiglu_oai" else ""
    return (f"experts: {n} per layer, {k} active per token"
            f"{' (their weights renormalized)' if cfg.get('expert_norm_topk') else ''}"
            f"{f', plus a shared expert of {shared}' if shared else ''}{glu}; "
            f"{active:,} of the experts' {total:,} parameters read per token")


def _tensor_lines(tensors: dict) -> list[str]:
    """One line per tensor: name, type, shape, bytes; aligned columns that grep and cut can read."""
    rows = [(name, w.format.name, "x".join(map(str, w.shape)) or "scalar", f"{w.nbytes:,}")
            for name, w in tensors.items()]
    if not rows:
        return []
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return [f"{n:<{widths[0]}}  {t:<{widths[1]}}  {s:<{widths[2]}}  {b:>{widths[3]}} bytes" for n, t, s, b in rows]


def _tensor_json(tensors: dict) -> list[dict]:
    return [{"name": name, "type": w.format.name, "shape": list(w.shape), "bytes": w.nbytes}
            for name, w in tensors.items()]


def _short_lists(meta: dict) -> dict:
    """GGUF metadata for people: long arrays (the vocabulary) by their length, the chat template
    by its size."""
    out = {k: (v if not isinstance(v, list) else f"[{len(v)} items]") for k, v in meta.items()
           if k != "tokenizer.chat_template"}
    if "tokenizer.chat_template" in meta:
        out["tokenizer.chat_template"] = f"<{len(meta['tokenizer.chat_template'])} chars>"
    return out


def _plain(v):
    """A metadata value as JSON can hold it (bytes as text, numpy scalars as numbers)."""
    if isinstance(v, (bytes, bytearray)):
        return v.decode("utf-8", "replace")
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v.item() if hasattr(v, "item") else v


def _stats(stats: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in stats.items()) or "no change"


def _target(t) -> str:
    if not isinstance(t, dict):
        return str(t)
    return f"{t.get('preset')} ({t.get('device')}" + (f", {t['isa']})" if t.get("isa") else ")")


def embedding_line(spec: dict) -> str:
    """An embedding model's pooling, as the manifest's or a frontend's ``embedding`` entry says."""
    return (f"embedding model: {' + '.join(map(str, spec.get('pooling') or []))} pooling, "
            f"{'normalized, ' if spec.get('normalize') else ''}{spec.get('dimension')} dimensions, "
            f"at most {spec.get('max_seq_length')} tokens per input")


def _describe_artifact(p, console, tensors: bool, as_json: bool):
    from .artifact import read_manifest
    m = read_manifest(p)
    if as_json:
        return {"path": str(p), "format": "kiln artifact", **m}
    console.print(f"[bold]{p}[/]: kiln artifact (format {m['format_version']}, kiln {m.get('kiln_version')})")
    source = m.get("source") or {}
    console.print(f"architecture {m.get('architecture')}, target {_target(m.get('target'))}, "
                  f"backend {m['backend'].get('name')}", markup=False)
    if isinstance(m.get("config"), dict):
        for line in (attention_layers(m["config"]), experts_line(m["config"])):
            if line:
                console.print(line, markup=False, soft_wrap=True)
    console.print(f"source {source.get('format')} {source.get('path')} sha256 {source.get('sha256')}", markup=False)
    b = m["backend"]
    kv = b.get("kv_cache") or {}
    if b.get("name") == "tvm":
        kv = f"in place, positions per {'row' if kv.get('mode') == 'rows' else 'batch (one length)'}"
        console.print(f"library {b.get('library')} for {b.get('target')}, weights {b.get('weights')}"
                      + (f", device code {b['device_source']} ({len(b.get('kernels', []))} kernels)"
                         if b.get("device_source") else ""), markup=False)
    else:
        kv = kv.get("layout")
    if b.get("requires"):
        console.print(f"needs {', '.join(b['requires'])}", markup=False)
    if isinstance(m.get("embedding"), dict):
        console.print(f"precision {m.get('precision', 'exact')}; {embedding_line(m['embedding'])}", markup=False)
    else:
        console.print(f"precision {m.get('precision', 'exact')}, KV cache {kv}", markup=False)
    q = m.get("quantization")
    if isinstance(q, dict):
        counts = ", ".join(f"{k} {v}" for k, v in (q.get("formats") or {}).items())
        console.print(f"quantized at compile time: {q.get('scheme')} ({q.get('kind')}"
                      f"{', requantized' if q.get('requantized') else ''}): {counts}; "
                      f"{q.get('kept_float', 0)} kept float", markup=False)
    for rec in m.get("passes", []):
        console.print(f"  pass {rec['name']}: {_stats(rec.get('stats') or {})}", markup=False)
    console.print(f"{len(m['files'])} files, {sum(f.get('bytes', 0) for f in m['files'].values()) / 1e6:.1f} MB")
    if tensors:
        # an artifact's weights live in its backend's own files: list those
        width = max((len(n) for n in m["files"]), default=0)
        for name, f in m["files"].items():
            console.print(f"{name:<{width}}  {f.get('bytes', 0):,} bytes", markup=False)
    return None


def describe(path, console, graph: str | None = None, tensors: bool = False, as_json: bool = False):
    """Print what ``path`` holds to ``console``; with ``as_json`` return it as a dict instead.
    ``tensors`` adds one line per tensor (an artifact: per file)."""
    from kiln.frontends.detect import resolve_path
    p = resolve_path(path)
    if p.is_dir() and (p / "manifest.json").is_file():
        return _describe_artifact(p, console, tensors, as_json)
    from kiln.frontends.detect import detect_format
    fmt = detect_format(p)
    info: dict = {"path": str(p), "format": fmt}
    if fmt == "gguf":
        from kiln.frontends.gguf_file import read_gguf
        f = read_gguf(p)
        weights = f.tensors
        # JSON keeps short arrays whole; the vocabulary and the template are summarised as in text
        info.update(version=f.version, alignment=f.alignment,
                    metadata={k: _plain(f.metadata[k] if isinstance(f.metadata[k], list) and len(f.metadata[k]) <= 64
                                        else v) for k, v in _short_lists(f.metadata).items()})
        if not as_json:
            console.print(f"[bold]{p}[/]: GGUF v{f.version}, {len(f.metadata)} metadata keys, alignment {f.alignment}")
            console.print(_config_table(_short_lists(f.metadata), "metadata"))
    elif fmt == "hf":
        from kiln.frontends import hf
        from kiln.frontends.sentence_transformers import is_sentence_transformers, read_layout
        if is_sentence_transformers(p):         # the model is the Transformer module's folder
            from .driver import load_model
            embedder = load_model(p)
            name, cfg, spec, folder = embedder.config["family"], embedder.config, embedder.embedding, read_layout(p)[0]
        else:
            family, arch = hf.arch_config(hf.read_config(p), p)
            name, cfg, spec, folder = family.name, arch.to_dict(), None, p
        weights = hf._open_tensors(folder)
        tok = [n for n in ("tokenizer.json", "tokenizer_config.json") if (folder / n).is_file()]
        info.update(architecture=name, config=cfg, tokenizer_files=tok, **({"embedding": spec} if spec else {}))
        if not as_json:
            kind = "sentence-transformers folder" if spec else "Hugging Face folder"
            console.print(f"[bold]{p}[/]: {kind}, architecture {name}")
            if spec:
                console.print(embedding_line(spec), markup=False)
            console.print(_config_table(cfg, "config"))
    elif fmt == "safetensors":
        from kiln.frontends.safetensors_file import read_safetensors
        f = read_safetensors(p)
        weights = f.tensors
        info.update(metadata=f.metadata)
        if not as_json:
            meta = ", ".join(f"{k}={v}" for k, v in (f.metadata or {}).items()) or "none"
            console.print(f"[bold]{p}[/]: safetensors, metadata {escape(meta)}")
    elif fmt == "onnx":
        from kiln.frontends import onnx_read
        info.update(onnx_read.describe(p))
        weights = info.pop("weights")
        if not as_json:
            console.print(f"[bold]{p}[/]: ONNX model ({info['layout']}), architecture {info['architecture']}")
            console.print(f"inputs: {', '.join(info['inputs'])}", markup=False)
            console.print(f"outputs: {', '.join(info['outputs'])}", markup=False)
            console.print(_config_table(info["config"], "config"))
    else:
        raise KilnError(p, f"cannot inspect {fmt} files")
    if as_json:
        info["tensors"] = _tensor_json(weights)
    else:
        console.print(_tensor_table(weights))
        if fmt == "hf":
            console.print(f"tokenizer: {', '.join(info['tokenizer_files']) or 'none'}")
        for line in _tensor_lines(weights) if tensors else ():
            console.print(line, markup=False)
    if fmt in ("gguf", "hf", "onnx"):
        from .driver import load_model
        model = load_model(p)
        tok = model.tokenizer
        if tok is not None:
            info["tokenizer"] = {"vocab_size": tok.tokenizer.get_vocab_size(), "bos": tok.bos_id,
                                 "eos": list(tok.eos_ids), "chat_template": bool(tok.chat_template)}
        info["graph"] = {"nodes": len(model.graph.nodes), "weights": len(model.graph.weights),
                         "ops": model.graph.op_counts()}
        if not as_json:
            if tok is not None:
                console.print(f"tokenizer: {tok.tokenizer.get_vocab_size()} tokens, bos {tok.bos_id}, "
                              f"eos {tok.eos_ids}, chat template {'yes' if tok.chat_template else 'no'}")
            for line in (attention_layers(model.config), experts_line(model.config)):
                if line:
                    console.print(line, markup=False, soft_wrap=True)
            ops = ", ".join(f"{op} {n}" for op, n in info["graph"]["ops"].items())
            console.print(f"graph: {len(model.graph.nodes)} nodes, {len(model.graph.weights)} weights; ops {ops}",
                          markup=False)
        if graph:
            write_graph(model.graph, graph)
            if not as_json:
                console.print(f"wrote {graph}")
    return info if as_json else None


def write_graph(g, path: str) -> None:
    from .irtext import to_json
    if path.endswith(".json"):
        Path(path).write_text(json.dumps(to_json(g), indent=1))
    elif path.endswith((".dot", ".graphml")):
        import networkx as nx
        G = nx.DiGraph()
        for n in g.nodes:
            G.add_node(n.name, label=n.op)
            for x in n.inputs:
                if x is not None and x.producer is not None:
                    G.add_edge(x.producer.name, n.name, label=str(x.type))
        if path.endswith(".dot"):
            lines = ["digraph kiln {"] + [f'  "{a}" [label="{d["label"]}"];' for a, d in G.nodes(data=True)]
            lines += [f'  "{a}" -> "{b}";' for a, b in G.edges()] + ["}"]
            Path(path).write_text("\n".join(lines))
        else:
            nx.write_graphml(G, path)
    else:
        Path(path).write_text(str(g))
