#!/usr/bin/env python3
"""llama.cpp's perplexity of a GGUF over the token ids kiln scores, with `kiln eval`'s windows,
so the two figures differ only by the engines' arithmetic (run with the llama-cpp-python venv's
Python; see benchmarks/README.md).

    .venv/bin/python benchmarks/llama_cpp_perplexity.py --dump-ids ART.kiln TEXT ids.json
    PEER_PY benchmarks/llama_cpp_perplexity.py MODEL.gguf ids.json [--window 512] [--stride 256]

Windows of --window tokens start --stride apart; each token after the first is scored once, in
the first window that holds it, with everything before it in that window as context (what
``Model.evaluate`` does). Prints one JSON line: perplexity and tokens scored.
"""
from __future__ import annotations

import argparse
import json
import math
import sys


def dump_ids(artifact: str, text: str, out: str) -> None:
    from kiln import runtime
    model = runtime.load(artifact)
    ids = [int(i) for i in model._ids(open(text, encoding="utf-8").read())]
    with open(out, "w") as f:
        json.dump(ids, f)
    print(f"wrote {out}: {len(ids)} ids")


def perplexity(gguf: str, ids: list[int], window: int, stride: int, threads: int) -> dict:
    import numpy as np
    from llama_cpp import Llama
    llm = Llama(model_path=gguf, n_ctx=window, n_batch=window, logits_all=True, n_threads=threads, verbose=False)
    nll, scored, done, begin = 0.0, 0, 1, 0
    while done < len(ids):
        end = min(begin + window, len(ids))
        llm.reset()
        llm.eval(ids[begin:end])
        logits = np.asarray(llm.scores[: end - begin], dtype=np.float64)
        for t in range(max(done, begin + 1), end):
            row = logits[t - 1 - begin]
            top = row.max()
            nll += top + math.log(np.exp(row - top).sum()) - row[ids[t]]
            scored += 1
        done = end
        begin += stride
    return {"perplexity": math.exp(nll / scored), "scored": scored}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--dump-ids":
        if len(sys.argv) != 5:
            sys.exit("usage: llama_cpp_perplexity.py --dump-ids ART.kiln TEXT OUT.json")
        dump_ids(*sys.argv[2:5])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf")
    ap.add_argument("ids", help="JSON list of token ids (--dump-ids)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--stride", type=int, help="default: half the window")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    with open(a.ids) as f:
        ids = json.load(f)
    print(json.dumps(perplexity(a.gguf, ids, a.window, a.stride or a.window // 2, a.threads)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
