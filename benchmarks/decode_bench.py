#!/usr/bin/env python3
"""kiln's prefill and decode speed beside the peers', measured in one run by one script.

    python benchmarks/decode_bench.py ARTIFACT.kiln [MORE.kiln ...] [--gguf MODEL.gguf] [--hf HF_DIR] [--oga OGA_DIR]
        [--llama-cpp-python PY] [--torch-python PY] [--oga-python PY]
        [--threads 2] [--repeats 3] [--tokens 128] [--prefill-tokens 130] [--context N]
        [--skip-missing] [--json OUT]

Every engine is timed by benchmarks/peers.py, run with that engine's own Python (kiln: this
one; the peers: their venvs, given by the flags or by KILN_LLAMA_CPP_PYTHON,
KILN_TORCH_PYTHON and KILN_OGA_PYTHON), with the same thread count, the same prompt, the same
numbers of tokens and the same number of timed runs. The engines take turns: each of the
--repeats rounds runs every engine once (a fresh process, one warm-up, one timed prefill and
one timed decode), so a change in the machine's speed during the benchmark hits all of them
alike. The table gives each engine's median tokens/s and every run's.

A peer asked for (by its model flag) that cannot run -- no Python given, not installed, or it
fails -- ends the benchmark with a non-zero exit status and its error, unless --skip-missing
is given, which leaves it out of the table with the reason.

See benchmarks/README.md for setting up the peer venvs and the models.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

PEERS = Path(__file__).resolve().parent / "peers.py"

# engine -> (model flag, python flag, environment variable)
PEER_ENGINES = {
    "llama.cpp": ("gguf", "llama_cpp_python", "KILN_LLAMA_CPP_PYTHON"),
    "transformers": ("hf", "torch_python", "KILN_TORCH_PYTHON"),
    "onnxruntime-genai": ("oga", "oga_python", "KILN_OGA_PYTHON"),
}


class EngineFailed(Exception):
    pass


def run_once(engine: str, python: str, model: str, a) -> dict:
    # "kiln NAME.kiln" labels a second artifact; the engine is the first word
    cmd = [python, str(PEERS), engine.split()[0], model, "--threads", str(a.threads), "--repeats", "1",
           "--tokens", str(a.tokens), "--prefill-tokens", str(a.prefill_tokens), "--context", str(a.context)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise EngineFailed(f"{engine}: {' '.join(cmd)}: {e}") from None
    if proc.returncode != 0:
        raise EngineFailed(f"{engine}: exit status {proc.returncode}: {' '.join(cmd)}\n{proc.stderr.strip()[-3000:]}")
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise EngineFailed(f"{engine}: no result line in its output: {proc.stdout[-1000:]!r}") from None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", nargs="+", help="compiled kiln artifacts (the first is the one ratios are of)")
    ap.add_argument("--gguf", help="the GGUF file for llama.cpp")
    ap.add_argument("--hf", help="the Hugging Face folder for transformers (float32)")
    ap.add_argument("--oga", help="the folder made by onnxruntime-genai's model builder")
    ap.add_argument("--llama-cpp-python", default=os.environ.get("KILN_LLAMA_CPP_PYTHON"),
                    help="python with llama-cpp-python (default: $KILN_LLAMA_CPP_PYTHON)")
    ap.add_argument("--torch-python", default=os.environ.get("KILN_TORCH_PYTHON"),
                    help="python with torch and transformers (default: $KILN_TORCH_PYTHON)")
    ap.add_argument("--oga-python", default=os.environ.get("KILN_OGA_PYTHON"),
                    help="python with onnxruntime-genai (default: $KILN_OGA_PYTHON)")
    ap.add_argument("--threads", type=int, default=2, help="threads for every engine (default 2)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per engine, taken in turns (default 3)")
    ap.add_argument("--tokens", type=int, default=128, help="greedy decode steps per run (default 128)")
    ap.add_argument("--prefill-tokens", type=int, default=130, help="prompt length for prefill (default 130)")
    ap.add_argument("--context", type=int, default=0,
                    help="tokens already in the cache when the timed decode steps start (default: the prompt)")
    ap.add_argument("--skip-missing", action="store_true", help="leave out a peer that cannot run instead of failing")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds one engine run may take")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    if a.repeats < 1 or a.threads < 1:
        ap.error("--repeats and --threads must be at least 1")

    engines: list[tuple[str, str, str]] = [
        ("kiln" if i == 0 else f"kiln {Path(p).name}", sys.executable, p) for i, p in enumerate(a.artifact)]
    skipped: dict[str, str] = {}
    for engine, (model_flag, python_flag, env) in PEER_ENGINES.items():
        model, python = getattr(a, model_flag), getattr(a, python_flag)
        if not model:
            continue
        if not python:
            reason = f"no Python for it: give --{python_flag.replace('_', '-')} or set {env}"
            if not a.skip_missing:
                print(f"decode_bench: {engine}: {reason}", file=sys.stderr)
                return 2
            skipped[engine] = reason
            continue
        engines.append((engine, python, model))

    runs: dict[str, list[dict]] = {name: [] for name, _, _ in engines}
    for r in range(a.repeats):
        for name, python, model in list(engines):
            try:
                runs[name].append(run_once(name, python, model, a))
            except EngineFailed as e:
                if name == "kiln" or not a.skip_missing:
                    print(f"decode_bench: {e}", file=sys.stderr)
                    return 1
                skipped[name] = str(e)
                engines = [x for x in engines if x[0] != name]
                del runs[name]
            print(f"round {r + 1}/{a.repeats}: {name} done", file=sys.stderr, flush=True)

    compile_s = {}
    for name, _, model in engines:
        manifest = Path(model) / "manifest.json"
        if Path(model).is_dir() and manifest.is_file():
            m = json.loads(manifest.read_text())
            compile_s[name] = (m.get("backend", {}).get("name", "?"), m.get("compile_seconds"))
    rows = []
    for name, results in runs.items():
        prefill = [x["prefill"]["runs_tokens_per_s"][0] for x in results]
        decode = [x["decode"]["runs_tokens_per_s"][0] for x in results]
        rows.append({"engine": name, "prefill_tokens_per_s": statistics.median(prefill), "prefill_runs": prefill,
                     "decode_tokens_per_s": statistics.median(decode), "decode_runs": decode,
                     "peak_rss_mb": max(x.get("peak_rss_mb", 0) for x in results),
                     "greedy": results[-1]["greedy"],
                     **({"backend": compile_s[name][0], "compile_s": compile_s[name][1]} if name in compile_s else {})})
    kiln = rows[0]
    print(f"decode_bench: {a.threads} threads, {a.repeats} runs per engine (median, then every run), "
          f"prefill {a.prefill_tokens} tokens, decode {a.tokens} tokens"
          + (f" after {a.context} tokens of context" if a.context else ""))
    print(f"{'engine':<26}{'backend':>8}{'compile s':>10}{'prefill tok/s':>15}{'decode tok/s':>14}"
          f"{'kiln decode vs it':>19}{'peak RSS MB':>13}  runs (prefill | decode)")
    for row in rows:
        ratio = "-" if row is kiln else f"{kiln['decode_tokens_per_s'] / row['decode_tokens_per_s']:.2f}x"
        every = (", ".join(f"{x:.1f}" for x in row["prefill_runs"]) + " | "
                 + ", ".join(f"{x:.1f}" for x in row["decode_runs"]))
        built = f"{row['compile_s']:.1f}" if row.get("compile_s") is not None else "-"
        print(f"{row['engine']:<26}{row.get('backend', '-'):>8}{built:>10}{row['prefill_tokens_per_s']:>15.1f}{row['decode_tokens_per_s']:>14.1f}{ratio:>19}"
              f"{row['peak_rss_mb']:>13.0f}  {every}")
    for name, reason in skipped.items():
        print(f"{name:<20} skipped: {reason}")
    if a.json:
        Path(a.json).write_text(json.dumps({"threads": a.threads, "repeats": a.repeats, "tokens": a.tokens,
                                            "context": a.context,
                                            "prefill_tokens": a.prefill_tokens, "rows": rows, "skipped": skipped},
                                           indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
