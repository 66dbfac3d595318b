"""``kiln inspect``: what a model file, folder or artifact holds."""
from __future__ import annotations

import json
from pathlib import Path

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
    """Which layers attend within a sliding window, in one line (None: none do)."""
    window = cfg.get("sliding_window")
    if not window:
        return None
    types = cfg.get("layer_types") or []
    if not types or all(t == "sliding_attention" for t in types):
        return f"attention: every layer within a sliding window of {window} tokens"
    if "sliding_attention" not in types:
        return "attention: every layer global"
    marks = "".join("S" if t == "sliding_attention" else "G" for t in types)
    n = marks.count("S")
    return (f"attention: {n} of {len(types)} layers within a sliding window of {window} tokens (S), the others "
            f"global (G), layer 0 first: {marks}")


def describe(path, console, graph: str | None = None) -> None:
    from kiln.frontends.detect import resolve_path
    p = resolve_path(path)
    if p.is_dir() and (p / "manifest.json").is_file():
        from .artifact import read_manifest
        m = read_manifest(p)
        console.print(f"[bold]{p}[/]: kiln artifact (format {m['format_version']}, kiln {m.get('kiln_version')})")
        source = m.get("source") or {}
        console.print(f"architecture {m.get('architecture')}, target {m.get('target')}, backend {m['backend'].get('name')}")
        if isinstance(m.get("config"), dict) and (line := attention_layers(m["config"])):
            console.print(line, markup=False, soft_wrap=True)
        console.print(f"source {source.get('format')} {source.get('path')} sha256 {source.get('sha256')}")
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
        console.print(f"precision {m.get('precision', 'exact')}, KV cache {kv}", markup=False)
        q = m.get("quantization")
        if isinstance(q, dict):
            counts = ", ".join(f"{k} {v}" for k, v in (q.get("formats") or {}).items())
            console.print(f"quantized at compile time: {q.get('scheme')} ({q.get('kind')}"
                          f"{', requantized' if q.get('requantized') else ''}): {counts}; "
                          f"{q.get('kept_float', 0)} kept float", markup=False)
        for rec in m.get("passes", []):
            console.print(f"  pass {rec['name']}: {rec['stats']}")
        console.print(f"{len(m['files'])} files, {sum(f.get('bytes', 0) for f in m['files'].values()) / 1e6:.1f} MB")
        return
    from kiln.frontends.detect import detect_format
    fmt = detect_format(p)
    if fmt == "gguf":
        from kiln.frontends.gguf_file import read_gguf
        f = read_gguf(p)
        console.print(f"[bold]{p}[/]: GGUF v{f.version}, {len(f.metadata)} metadata keys, alignment {f.alignment}")
        meta = {k: (v if not isinstance(v, list) else f"[{len(v)} items]") for k, v in f.metadata.items()
                if k != "tokenizer.chat_template"}
        if "tokenizer.chat_template" in f.metadata:
            meta["tokenizer.chat_template"] = f"<{len(f.metadata['tokenizer.chat_template'])} chars>"
        console.print(_config_table(meta, "metadata"))
        console.print(_tensor_table(f.tensors))
    elif fmt == "hf":
        from kiln.frontends import hf
        raw = hf.read_config(p)
        family, cfg = hf.arch_config(raw, p)
        console.print(f"[bold]{p}[/]: Hugging Face folder, architecture {family.name}")
        console.print(_config_table(cfg.to_dict(), "config"))
        console.print(_tensor_table(hf._open_tensors(p)))
        tok = [n for n in ("tokenizer.json", "tokenizer_config.json") if (p / n).is_file()]
        console.print(f"tokenizer: {', '.join(tok) if tok else 'none'}")
    elif fmt == "safetensors":
        from kiln.frontends.safetensors_file import read_safetensors
        f = read_safetensors(p)
        console.print(f"[bold]{p}[/]: safetensors, metadata {f.metadata}")
        console.print(_tensor_table(f.tensors))
    else:
        raise KilnError(p, f"cannot inspect {fmt} files")
    if fmt in ("gguf", "hf") and True:
        from .driver import load_model
        model = load_model(p)
        tok = model.tokenizer
        if tok is not None:
            console.print(f"tokenizer: {tok.tokenizer.get_vocab_size()} tokens, bos {tok.bos_id}, eos {tok.eos_ids}, "
                          f"chat template {'yes' if tok.chat_template else 'no'}")
        if line := attention_layers(model.config):
            console.print(line, markup=False, soft_wrap=True)
        console.print(f"graph: {len(model.graph.nodes)} nodes, {len(model.graph.weights)} weights; ops {model.graph.op_counts()}")
        if graph:
            write_graph(model.graph, graph)
            console.print(f"wrote {graph}")


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
