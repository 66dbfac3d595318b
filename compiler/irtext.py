"""The IR as readable text (one node per line) and as JSON that round-trips.

JSON keeps the structure and the constants; weights are referred to by name with their format
and shape, since their data lives in the source file.
"""
from __future__ import annotations

import json

import numpy as np

from .ir import Graph, Value
from .weights import Weight


def _attr(v) -> str:
    if isinstance(v, float):
        return repr(v)
    return json.dumps(v) if not isinstance(v, str) else v


def _const_text(v: Value) -> str:
    a = v.const
    if a.size <= 8:
        return json.dumps(a.tolist())
    return f"<{a.size} values>"


def to_text(g: Graph) -> str:
    ins = ", ".join(f"%{v.name}: {v.type}" for v in g.inputs)
    outs = ", ".join(f"%{v.name}: {v.type}" for v in g.outputs)
    lines = [f"graph {g.name}({ins}) -> ({outs}) {{"]
    for name, v in g.weights.items():
        lines.append(f"  weight %{name}: {v.type} stored {v.weight.format.name}")
    for v in g.consts:
        lines.append(f"  const %{v.name}: {v.type} = {_const_text(v)}")
    for n in g.nodes:
        outs = ", ".join(f"%{o.name}" for o in n.outputs)
        args = ", ".join("_" if x is None else f"%{x.name}" for x in n.inputs)
        attrs = " {" + ", ".join(f"{k}={_attr(a)}" for k, a in n.attrs.items()) + "}" if n.attrs else ""
        types = ", ".join(str(o.type) for o in n.outputs)
        lines.append(f"  {outs} = {n.op}({args}){attrs} : {types}")
    lines.append("}")
    return "\n".join(lines)


def to_json(g: Graph) -> dict:
    def t(v):
        return {"dtype": v.type.dtype, "shape": list(v.type.shape)}
    return {
        "name": g.name,
        "inputs": [{"name": v.name, **t(v)} for v in g.inputs],
        "weights": [{"name": k, **t(v), "format": v.weight.format.name, "stored_shape": list(v.weight.shape)}
                    for k, v in g.weights.items()],
        "consts": [{"name": v.name, **t(v), "value": v.const.tolist()} for v in g.consts],
        "nodes": [{"op": n.op, "name": n.name, "inputs": [None if x is None else x.name for x in n.inputs],
                   "attrs": n.attrs, "outputs": [o.name for o in n.outputs]} for n in g.nodes],
        "outputs": [v.name for v in g.outputs],
        "meta": g.meta,
    }


def from_json(data: dict, weights: dict[str, Weight] | None = None) -> Graph:
    """Rebuild a graph; ``weights`` supplies weight data by name (placeholders otherwise)."""
    g = Graph(data["name"])
    env: dict[str, Value] = {}
    for i in data["inputs"]:
        env[i["name"]] = g.add_input(i["name"], i["dtype"], i["shape"])
    for w in data["weights"]:
        weight = (weights or {}).get(w["name"]) or Weight(w["stored_shape"], w["format"], _missing(w["name"]), name=w["name"])
        env[w["name"]] = g.add_weight(w["name"], weight, w["dtype"])
    for c in data["consts"]:
        env[c["name"]] = g.const(np.asarray(c["value"], dtype=c["dtype"]).reshape(c["shape"]), name=c["name"])
    for n in data["nodes"]:
        outs = g.add_node(n["op"], [None if x is None else env[x] for x in n["inputs"]], n["attrs"],
                          name=n["name"], output_names=n["outputs"])
        env.update({o.name: o for o in outs})
    g.outputs = [env[o] for o in data["outputs"]]
    g.meta = dict(data.get("meta", {}))
    return g


def _missing(name):
    def load():
        raise ValueError(f"weight {name} has no data (graph read from JSON without weights)")
    return load
