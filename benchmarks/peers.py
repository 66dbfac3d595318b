#!/usr/bin/env python3
"""Times one engine on one model: the measurement benchmarks/decode_bench.py makes of every
engine, kiln included, so that all of them are timed by the same code.

    ENGINE_PYTHON benchmarks/peers.py ENGINE MODEL [--threads 2] [--repeats 3] [--tokens 128]
                                      [--prefill-tokens 130] [--context N] [--prompt TEXT]

Run it with the Python of the engine's own venv (it imports only the standard library and
numpy at start, the engine when it runs):

    kiln               a compiled artifact (kiln's venv)
    llama.cpp          a GGUF file (llama-cpp-python)
    onnxruntime-genai  a folder made by onnxruntime-genai's model builder
    transformers       a Hugging Face folder, run in float32 (torch + transformers)

What is timed, the same for every engine:

- prefill: the prompt's token ids repeated to --prefill-tokens ids, evaluated from an empty
  cache with the logits of the last position only; one untimed warm-up, then --repeats timed
  runs;
- decode: from an empty cache the prompt (repeated to --context ids when given, so the
  steps run with that much already in the cache) is evaluated (untimed) and its greedy token
  chosen; then --tokens greedy steps are timed, each one forward pass over one new token and an argmax
  (onnxruntime-genai: one generate_next_token), --repeats times.

Every engine gets --threads threads for its matrix work. The result is one JSON line on stdout:
the seconds of every timed run, the token counts, the first 16 greedy ids and the process's
peak resident memory. Any failure (the
engine not importable, the model not loading) ends the script with a non-zero exit status and
the error on stderr.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROMPT = "The capital of France is"


def repeated(ids: list[int], n: int) -> list[int]:
    return (ids * (n // max(len(ids), 1) + 1))[:n]


def context(ids: list[int], a) -> list[int]:
    """The decode prompt: the prompt's ids, or repeated to --context ids."""
    return repeated(ids, a.context) if a.context else ids


# ---- engines: each returns (prefill seconds per run, decode seconds per run, greedy ids) ------

def run_kiln(path: str, a) -> tuple[list[float], list[float], list[int]]:
    from kiln import runtime
    model = runtime.load(path, threads=a.threads)
    sess = model.session
    ids = context(model.tokenizer.encode(a.prompt), a)
    long = np.asarray([repeated(ids, a.prefill_tokens)], dtype=np.int64)

    def prefill() -> float:
        sess.reset(1)
        t = time.perf_counter()
        sess.forward(long, last_only=True)
        return time.perf_counter() - t

    def decode() -> tuple[float, list[int]]:
        sess.reset(1)
        tok = int(np.argmax(sess.forward(np.asarray([ids], dtype=np.int64), last_only=True)[0, -1]))
        out = [tok]
        t = time.perf_counter()
        for _ in range(a.tokens):
            tok = int(np.argmax(sess.forward(np.asarray([[tok]], dtype=np.int64), last_only=True)[0, -1]))
            out.append(tok)
        return time.perf_counter() - t, out
    return measure(prefill, decode, a)


def run_llama_cpp(path: str, a) -> tuple[list[float], list[float], list[int]]:
    from llama_cpp import Llama
    llm = Llama(model_path=path, n_threads=a.threads, n_threads_batch=a.threads,
                n_ctx=max(a.prefill_tokens, a.context, 64) + a.tokens + 64, n_batch=512, logits_all=False,
                verbose=False)
    n_vocab = llm.n_vocab()
    ids = context(llm.tokenize(a.prompt.encode(), add_bos=False, special=False), a)
    long = repeated(ids, a.prefill_tokens)

    def last_logits() -> np.ndarray:
        # without logits_all only the last position's row is computed
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))

    def prefill() -> float:
        llm.reset()
        t = time.perf_counter()
        llm.eval(long)
        return time.perf_counter() - t

    def decode() -> tuple[float, list[int]]:
        llm.reset()
        llm.eval(ids)
        tok = int(np.argmax(last_logits()))
        out = [tok]
        t = time.perf_counter()
        for _ in range(a.tokens):
            llm.eval([tok])
            tok = int(np.argmax(last_logits()))
            out.append(tok)
        return time.perf_counter() - t, out
    return measure(prefill, decode, a)


def _oga_folder_with_threads(folder: str, threads: int) -> str:
    """The builder's folder as links, with genai_config.json asking for ``threads`` threads."""
    src = Path(folder)
    out = Path(tempfile.mkdtemp(prefix="oga-threads-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    for f in src.iterdir():
        if f.name != "genai_config.json":
            (out / f.name).symlink_to(f.resolve())
    cfg = json.loads((src / "genai_config.json").read_text())
    opts = cfg["model"]["decoder"].setdefault("session_options", {})
    opts["intra_op_num_threads"] = threads
    opts["inter_op_num_threads"] = 1
    (out / "genai_config.json").write_text(json.dumps(cfg, indent=2))
    return str(out)


def run_onnxruntime_genai(path: str, a) -> tuple[list[float], list[float], list[int]]:
    import onnxruntime_genai as og
    model = og.Model(_oga_folder_with_threads(path, a.threads))
    ids = context([int(t) for t in og.Tokenizer(model).encode(a.prompt)], a)
    long = repeated(ids, a.prefill_tokens)

    def generator(max_length: int):
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=max_length, min_length=max_length)
        return og.Generator(model, params)

    def prefill() -> float:
        gen = generator(len(long) + 2)
        t = time.perf_counter()
        gen.append_tokens(long)
        gen.generate_next_token()          # the prompt's logits are computed by now, and used
        return time.perf_counter() - t

    def decode() -> tuple[float, list[int]]:
        gen = generator(len(ids) + a.tokens + 2)
        gen.append_tokens(ids)
        gen.generate_next_token()          # the prompt's greedy token, as the others pick untimed
        out = [int(gen.get_next_tokens()[0])]
        t = time.perf_counter()
        for _ in range(a.tokens):
            gen.generate_next_token()      # one forward over the last token, then the argmax
            out.append(int(gen.get_next_tokens()[0]))
        return time.perf_counter() - t, out
    return measure(prefill, decode, a)


def run_transformers(path: str, a) -> tuple[list[float], list[float], list[int]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = context(tok(a.prompt, add_special_tokens=False).input_ids, a)
    long = torch.tensor([repeated(ids, a.prefill_tokens)])

    @torch.inference_mode()
    def prefill() -> float:
        t = time.perf_counter()
        model(input_ids=long, use_cache=True, logits_to_keep=1)
        return time.perf_counter() - t

    @torch.inference_mode()
    def decode() -> tuple[float, list[int]]:
        res = model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        tok = int(res.logits[0, -1].argmax())
        out = [tok]
        t = time.perf_counter()
        for _ in range(a.tokens):
            res = model(input_ids=torch.tensor([[tok]]), past_key_values=res.past_key_values, use_cache=True)
            tok = int(res.logits[0, -1].argmax())
            out.append(tok)
        return time.perf_counter() - t, out
    return measure(prefill, decode, a)


ENGINES = {"kiln": run_kiln, "llama.cpp": run_llama_cpp, "onnxruntime-genai": run_onnxruntime_genai,
           "transformers": run_transformers}


def measure(prefill, decode, a) -> tuple[list[float], list[float], list[int]]:
    prefill()                                               # warm-up
    prefill_s = [prefill() for _ in range(a.repeats)]
    decode_s, greedy = [], []
    for _ in range(a.repeats):
        seconds, greedy = decode()
        decode_s.append(seconds)
    return prefill_s, decode_s, greedy


def summary(runs_s: list[float], tokens: int) -> dict:
    """Tokens per second of every run and their median."""
    rates = [tokens / s for s in runs_s]
    return {"tokens_per_s": statistics.median(rates), "runs_tokens_per_s": rates}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engine", choices=sorted(ENGINES))
    ap.add_argument("model", help="artifact, GGUF file, builder folder or HF folder, as the engine reads")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128, help="greedy decode steps per timed run")
    ap.add_argument("--prefill-tokens", type=int, default=130)
    ap.add_argument("--context", type=int, default=0, help="tokens in the cache before the timed decode steps")
    ap.add_argument("--prompt", default=PROMPT)
    a = ap.parse_args()
    if a.threads < 1 or a.repeats < 1 or a.tokens < 1 or a.prefill_tokens < 1:
        ap.error("--threads, --repeats, --tokens and --prefill-tokens must be at least 1")
    if not os.path.exists(a.model):
        print(f"peers.py: {a.engine}: {a.model}: no such file or folder", file=sys.stderr)
        return 2
    try:
        prefill_s, decode_s, greedy = ENGINES[a.engine](a.model, a)
    except ImportError as e:
        print(f"peers.py: {a.engine} is not installed in {sys.executable} ({e})", file=sys.stderr)
        return 3
    print(json.dumps({
        "engine": a.engine, "model": a.model, "python": sys.executable, "threads": a.threads,
        "repeats": a.repeats, "prefill_tokens": a.prefill_tokens, "decode_tokens": a.tokens,
        "prefill_s": prefill_s, "decode_s": decode_s,
        "prefill": summary(prefill_s, a.prefill_tokens), "decode": summary(decode_s, a.tokens),
        "greedy": greedy[:16], "context": a.context,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
