"""``kiln embed ARTIFACT TEXT...``: an embedding artifact's vectors, as JSON or a table."""
from __future__ import annotations

import json
import sys

from kiln import cli_flags as flags


def add_parser(sub) -> None:
    s = sub.add_parser("embed", help="vectors of texts or token ids from an embedding artifact")
    s.add_argument("artifact")
    s.add_argument("inputs", nargs="*", metavar="TEXT", help="texts to embed ('-': one text per line of stdin)")
    s.add_argument("--ids", action="append", default=[], metavar="ID,ID,...",
                   help="an input as comma-separated token ids, special tokens included (repeatable)")
    s.add_argument("--format", choices=("json", "table"), default="json",
                   help="json: {dimension, data: [{index, tokens, embedding}]} (default); table: one row per "
                        "input with its first values")
    s.add_argument("--truncate", action="store_true",
                   help="cut inputs longer than the model's max_seq_length there (default: refuse them)")
    flags.threads_flag(s)
    s.set_defaults(fn=cmd_embed)


def _inputs(a) -> list:
    out = []
    for text in a.inputs:
        if text == "-":
            out.extend(line for line in sys.stdin.read().splitlines() if line)
        else:
            out.append(text)
    for spec in a.ids:
        try:
            out.append([int(t) for t in spec.split(",") if t.strip()])
        except ValueError:
            raise ValueError(f"--ids {spec!r} is not a comma-separated list of token ids") from None
    if not out:
        raise ValueError("give texts to embed (or --ids, or '-' to read lines from stdin)")
    return out


def cmd_embed(a) -> int:
    from kiln import runtime
    inputs = _inputs(a)
    model = runtime.load(a.artifact, threads=a.threads)
    if model.embedding is None:
        raise ValueError(f"{a.artifact}: not an embedding model (compile a sentence-transformers folder "
                         "to get one; kiln run generates text)")
    rows = model.embedding_tokens(inputs, truncate=a.truncate)
    vectors = model.embed(rows)
    if a.format == "json":
        print(json.dumps({"dimension": int(vectors.shape[1]), "pooling": model.embedding.get("pooling"),
                          "normalized": bool(model.embedding.get("normalize")),
                          "data": [{"index": i, "tokens": len(r), "embedding": [float(x) for x in v]}
                                   for i, (r, v) in enumerate(zip(rows, vectors))]}))
        return 0
    shown = min(4, vectors.shape[1])
    print(f"{'#':>3}  {'tokens':>6}  {'norm':>7}  first {shown} of {vectors.shape[1]} values  input")
    for i, (x, r, v) in enumerate(zip(inputs, rows, vectors)):
        label = x if isinstance(x, str) else ",".join(map(str, x))
        label = label if len(label) <= 40 else label[:37] + "..."
        values = " ".join(f"{float(t):+.4f}" for t in v[:shown])
        print(f"{i:>3}  {len(r):>6}  {float((v.astype('float64') ** 2).sum() ** 0.5):>7.4f}  {values}  {label}")
    return 0
