"""The ``kiln`` command: inspect, compile, run, serve, verify, bench, convert.

Errors a user can act on print as one line ``kiln: PATH: PROBLEM`` and exit with code 2;
set KILN_DEBUG=1 to see the traceback of an unexpected failure.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from kiln import cli_checks as checks
from kiln import cli_flags as flags


def _console(stderr: bool = True, markup: bool = True):
    from rich.console import Console
    con = Console(stderr=stderr, highlight=False, markup=markup)
    if not con.is_terminal:
        # a pipe or a file: whole lines for grep and cut, whatever width COLUMNS claims
        con.width = 1 << 15
        con.soft_wrap = True
    return con


# ---- compile --------------------------------------------------------------------------------

def cmd_compile(a) -> int:
    from kiln.driver import compile as kiln_compile
    from kiln.progress import advance, write_progress
    con = _console()
    # progress bars only on a terminal: in a pipe or a log, rich's live display would leave a
    # stray empty line ahead of the one-line error message. The weights a backend writes are
    # not the model's tensors one for one (split planes, packed blocks): a count, no total
    with write_progress(con, unit="weights", disable=a.quiet or not con.is_terminal) as prog:
        task = prog.add_task("reading model", total=None, bytes=0)

        def on_stage(s):
            prog.update(task, description=s)

        pass_lines = []

        def on_pass(rec):
            # reported once the artifact exists, so a failed build prints only its error line
            stats = ", ".join(f"{k}={v}" for k, v in rec.stats.items()) or "no change"
            pass_lines.append(f"  pass {rec.name:<12} {stats}  ({rec.seconds * 1000:.0f} ms)")

        def on_weight(name):
            advance(prog, task, f"writing weights: {name}")

        t = time.perf_counter()
        out = kiln_compile(a.model, target=a.target, output=a.output, verify=a.verify, dump_ir=a.dump_ir,
                           on_pass=on_pass, on_weight=on_weight, on_stage=on_stage,
                           quant=a.quant, requantize=a.requantize, precision=a.precision,
                           backend=a.backend, arch=a.arch, kv_dtype=a.kv_dtype, force=a.force,
                           lora=flags.lora_specs(a), sign=a.sign, imatrix=a.imatrix,
                           on_notice=lambda s: con.print(f"kiln: {s}", markup=False, soft_wrap=True))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    if not a.quiet:
        for line in pass_lines:
            con.print(line, markup=False)
    con.print(f"wrote {out} ({size / 1e6:.1f} MB) in {time.perf_counter() - t:.1f} s")
    return 0


# ---- run ------------------------------------------------------------------------------------

def cmd_run(a) -> int:
    from kiln import runtime
    model = runtime.load(a.artifact, threads=a.threads, trusted_keys=a.trusted_key)
    if a.ids is not None:
        if a.prompt is not None or a.chat:
            raise ValueError("--ids gives the prompt already rendered; drop --prompt and --chat")
        prompt = flags.id_list(a.ids)
    elif a.chat and a.prompt is None and sys.stdin.isatty():
        # typed, not piped: a conversation, as `kiln chat` (a pipe is still read to EOF)
        from kiln import chat_repl
        return chat_repl.run(model, a)
    else:
        prompt = a.prompt if a.prompt is not None else sys.stdin.read()
    if a.chat:
        messages = []
        if a.system:
            messages.append({"role": "system", "content": a.system})
        messages.append({"role": "user", "content": prompt})
        prompt = model.chat_prompt(messages)
    kwargs = dict(max_new_tokens=_new_tokens_within(a, model, prompt), temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                  min_p=a.min_p, repetition_penalty=a.repetition_penalty, seed=a.seed, stop=a.stop or None)
    if a.draft:
        kwargs.update(draft=runtime.load(a.draft, threads=a.threads, trusted_keys=a.trusted_key),
                      draft_tokens=a.draft_tokens)
    if a.num_beams != 1 or a.num_return_sequences != 1:
        return _run_beams(a, model, prompt, kwargs)
    from kiln.stream_out import write_stream
    out = sys.stdout
    result = write_stream(model.stream(prompt, **kwargs), out)
    if a.ids is None or model.tokenizer is not None:
        out.write("\n")
    if a.ids is not None:
        # ids in, ids out: the new tokens on a line of their own, for scripts to read
        out.write(",".join(str(t) for t in result.ids) + "\n")
    if a.verbose and result is not None:
        t = result.timings
        _console(markup=False).print(f"[{result.finish_reason}] prompt {result.prompt_tokens} tokens, "
                         f"{len(result.ids)} new; " + ", ".join(f"{k}={v:.3g}" for k, v in t.items()))
    return 0


def _new_tokens_within(a, model, prompt) -> int:
    """--max-new-tokens, capped so the prompt and the answer fit in -c/--ctx-size tokens."""
    ctx = a.ctx_size
    if ctx is None:
        return a.max_new_tokens
    from kiln.runtime.context_size import checked
    checked(ctx, model.session.max_length)
    if isinstance(prompt, list):
        used = len(prompt)
    elif model.tokenizer is not None:
        used = len(model.tokenizer.encode(prompt, add_special_tokens=True))
    else:
        return a.max_new_tokens             # the run fails on its own: no tokenizer for the text
    if used >= ctx:
        raise ValueError(f"the prompt has {used} tokens, which leaves none of -c/--ctx-size {ctx} for the answer")
    return min(a.max_new_tokens, ctx - used)


def _run_beams(a, model, prompt, kwargs) -> int:
    """Beam search prints when it ends (no streaming): each returned hypothesis, best first,
    as text and/or its ids line, and with -v its score."""
    results = model.generate(prompt, num_beams=a.num_beams, length_penalty=a.length_penalty,
                             early_stopping=a.early_stopping, num_return_sequences=a.num_return_sequences,
                             **kwargs)
    for result in results if isinstance(results, list) else [results]:
        if a.ids is None or model.tokenizer is not None:
            sys.stdout.write(result.text + "\n")
        if a.ids is not None:
            sys.stdout.write(",".join(str(t) for t in result.ids) + "\n")
        sys.stdout.flush()
        if a.verbose:
            _console(markup=False).print(f"[{result.finish_reason}] score {result.score:.6g}, prompt "
                                         f"{result.prompt_tokens} tokens, {len(result.ids)} new")
    return 0


# ---- chat -----------------------------------------------------------------------------------

def cmd_chat(a) -> int:
    from kiln import chat_repl
    return chat_repl.main(a)


# ---- bench ----------------------------------------------------------------------------------

def peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cmd_bench(a) -> int:
    import numpy as np
    from rich.table import Table

    from kiln import runtime
    peers = None
    if a.peers_json:
        if not a.plot:
            raise ValueError("--peers-json draws peers' lines on the --plot picture; give --plot FILE too")
        from kiln.benchplot import read_peer_runs
        peers = read_peer_runs(a.peers_json)         # before measuring: a bad file fails at once
    if a.plot:
        checks.check_writable(a.plot)        # before measuring, not after a minute of it
    def say(what):
        # a benchmark runs for a minute: say what is being timed as it goes (stderr: the table
        # and --json stay alone on stdout)
        print(f"kiln bench: {what}", file=sys.stderr, flush=True)
    say(f"loading {a.artifact}")
    t = time.perf_counter()
    model = runtime.load(a.artifact, threads=a.threads)
    load_s = time.perf_counter() - t
    draft = runtime.load(a.draft, threads=a.threads) if a.draft else None
    tok = model.tokenizer
    base = tok.encode(a.prompt) if tok else [1, 2, 3, 4, 5]
    long = (base * (a.prefill_tokens // max(len(base), 1) + 1))[: a.prefill_tokens]
    sess = model.session
    from kiln.runtime import context_size
    context_size.limit(sess, a.ctx_size)
    decode = f"(with --decode-tokens {a.decode_tokens})"
    context_size.check_runs([(f"the prefill timing (--prefill-tokens {len(long)})", len(long)),
                             (f"the decode timing after the {len(base)}-token prompt {decode}", len(base) + a.decode_tokens)]
                            + [(f"the decode timing after --context {c} {decode}", c + a.decode_tokens)
                               for c in a.context or []], sess, given=a.ctx_size is not None)
    prefill = []
    repeats = f"{a.repeats} run{'s' if a.repeats != 1 else ''}"
    say(f"timing prefill of {len(long)} tokens ({repeats} after a warm-up)")
    for _ in range(a.repeats + 1):                       # first run warms up
        sess.reset(1)
        t = time.perf_counter()
        sess.forward(np.asarray([long]), last_only=True)
        prefill.append(time.perf_counter() - t)
    prefill_tps = len(long) / min(prefill[1:])
    def decode_tps(prompt: list[int]) -> float:
        """Greedy steps per second after ``prompt`` (the fastest of the runs)."""
        runs = []
        for _ in range(a.repeats):
            sess.reset(1)
            logits = sess.forward(np.asarray([prompt]), last_only=True)
            t = time.perf_counter()
            for _ in range(a.decode_tokens):
                logits = sess.forward(np.asarray([[int(np.argmax(logits[0, -1]))]]), last_only=True)
            runs.append(time.perf_counter() - t)
        return a.decode_tokens / min(runs)

    say(f"timing decode of {a.decode_tokens} tokens after the {len(base)}-token prompt ({repeats})")
    decode_rate = decode_tps(base)
    # decode speed with ctx tokens already in the cache (attention grows with it)
    by_context = {}
    for ctx in a.context or []:
        say(f"timing decode of {a.decode_tokens} tokens after {ctx} tokens of context ({repeats})")
        by_context[ctx] = decode_tps((base * (ctx // max(len(base), 1) + 1))[:ctx])
    table = Table(title=f"kiln bench {a.artifact}")
    for col in ("metric", "value"):
        table.add_column(col)
    table.add_row("backend", model.manifest["backend"]["name"])
    table.add_row("threads", str(a.threads or os.cpu_count()))
    table.add_row("load", f"{load_s:.2f} s")
    table.add_row(f"prefill ({len(long)} tokens)", f"{prefill_tps:.1f} tokens/s")
    table.add_row(f"decode ({a.decode_tokens} tokens, greedy)", f"{decode_rate:.1f} tokens/s")
    for ctx, tps in by_context.items():
        table.add_row(f"decode after {ctx} tokens of context", f"{tps:.1f} tokens/s")
    drafted = None
    if draft is not None:
        from kiln.bench_draft import measure
        say(f"timing decode of {a.decode_tokens} tokens with the draft {a.draft} ({repeats})")
        drafted = measure(model, draft, base, a.decode_tokens, a.repeats, a.draft_tokens)
        for row in drafted.rows():
            table.add_row(*row)
    table.add_row("peak memory (RSS)", f"{peak_rss_mb():.0f} MB")
    _console(stderr=False).print(table)
    if a.json:
        import json
        print(json.dumps({"prefill_tokens_per_s": prefill_tps, "decode_tokens_per_s": decode_rate,
                          "decode_tokens_per_s_at_context": {str(c): v for c, v in by_context.items()},
                          "peak_rss_mb": peak_rss_mb(), "load_s": load_s,
                          **(drafted.as_json() if drafted else {})}))
    if a.plot:
        from kiln.benchplot import machine, plot_decode
        # the load average says whether the figures come from a quiet machine
        note = (f"{machine()}, load average {os.getloadavg()[0]:.1f}, {a.threads or os.cpu_count()} threads; "
                f"kiln bench {a.artifact} --decode-tokens {a.decode_tokens} --repeats {a.repeats}"
                + (f"; peers: {', '.join(os.path.basename(f) for f in a.peers_json)}" if a.peers_json else ""))
        plot_decode(a.plot, {len(base): decode_rate, **by_context}, peers,
                    label=f"kiln ({model.manifest['backend']['name']})", note=note)
        print(f"wrote {a.plot}", file=sys.stderr)
    return 0


# ---- eval -----------------------------------------------------------------------------------

def cmd_eval(a) -> int:
    import json
    from pathlib import Path

    from kiln import runtime
    model = runtime.load(a.artifact, threads=a.threads)
    if model.tokenizer is None:
        raise ValueError(f"{a.artifact}: the artifact has no tokenizer to read {a.text} with")
    try:
        text = Path(a.text).read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"{a.text}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{a.text}: not UTF-8 text") from None
    ids = model.tokenizer.encode(text)
    if a.max_tokens:
        ids = ids[:a.max_tokens]
    r = model.evaluate(ids, window=a.window, stride=a.stride)
    print(f"perplexity {r['perplexity']:.4f} over {r['tokens']} tokens (window {r['window']}, stride "
          f"{r['stride']}), {r['tokens_per_s']:.0f} tokens/s")
    if a.json:
        print(json.dumps(r))
    return 0


# ---- serve ----------------------------------------------------------------------------------

def cmd_serve(a) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        from kiln.errors import KilnError
        raise KilnError(None, "kiln serve needs FastAPI and uvicorn: pip install 'kiln[serve]'") from None
    checks.check_port(a.host, a.port)        # before loading, and before "serving on ..."
    from kiln.runtime import TRUSTED_KEYS_ENV
    from kiln.runtime.server import serve
    if a.trusted_key:          # the server loads through runtime.load, which reads this
        os.environ[TRUSTED_KEYS_ENV] = os.pathsep.join(a.trusted_key)
    serve(a.artifact, host=a.host, port=a.port, max_batch=a.max_batch, max_queue=a.max_queue,
          api_key=_api_key(a.api_key), threads=a.threads, names=_served_names(a),
          max_body=a.max_body_size, read_timeout=a.read_timeout, shutdown_timeout=a.shutdown_timeout,
          ctx_size=a.ctx_size, prefix_cache_mb=a.prefix_cache_mb,
          prefill_step_s=a.prefill_step_ms / 1000 if a.prefill_step_ms else None,
          draft=a.draft, draft_tokens=a.draft_tokens)
    return 0


def _api_key(flag: str | None) -> str | None:
    """--api-key, else $KILN_API_KEY; an empty one is refused, not taken as "no key"."""
    from kiln.errors import KilnError
    where, key = ("--api-key", flag) if flag is not None else ("$KILN_API_KEY", os.environ.get("KILN_API_KEY"))
    if key is not None and not key.strip():
        raise KilnError(None, f"{where} is empty; give a key, or leave it out to serve without one")
    return key


def _served_names(a) -> list[str]:
    """--served-model-name, else the artifact's folder name and, for a known model's file, its
    short name (``smollm2``) as an alias."""
    from pathlib import Path

    from kiln.artifact import read_manifest
    from kiln.errors import KilnError
    from kiln.frontends.known_models import short_name_of
    if a.served_model_name:
        if not all(n.strip() for n in a.served_model_name):
            raise KilnError(None, "--served-model-name is empty")
        return a.served_model_name
    names = [Path(a.artifact).resolve().name.removesuffix(".kiln")]
    alias = short_name_of((read_manifest(a.artifact).get("source") or {}).get("path"))
    return names + [alias] if alias and alias not in names else names


# ---- verify ---------------------------------------------------------------------------------

def cmd_verify(a) -> int:
    from kiln.artifact import open_checked
    from kiln.signing import trust_lines
    m = open_checked(a.artifact, verify=True, trusted_keys=a.key)
    size = sum(f["bytes"] for f in m["files"].values())
    print(f"{a.artifact}: ok, manifest and {len(m['files'])} files match their sha256 ({size / 1e6:.1f} MB)")
    for line in trust_lines(a.artifact, m, a.key):
        print(f"{a.artifact}: {line}")
    return 0


# ---- inspect --------------------------------------------------------------------------------

def cmd_inspect(a) -> int:
    from kiln.inspect import describe
    con = _console(stderr=False)
    info = describe(a.model, con, graph=a.graph, tensors=a.tensors, as_json=a.json)
    if a.json:
        import json
        print(json.dumps(info, indent=2))
    return 0


# ---- list -----------------------------------------------------------------------------------

def cmd_list(a) -> int:
    from kiln.listing import render
    render(_console(stderr=False))
    return 0


# ---- convert --------------------------------------------------------------------------------

def cmd_convert(a) -> int:
    from kiln.driver import convert
    from kiln.errors import KilnError
    from kiln.formats import set_threads
    if a.threads is not None:
        if a.threads < 1:
            raise KilnError(None, f"--threads {a.threads}: give at least 1")
        set_threads(a.threads)
    con = _console()
    t = time.perf_counter()
    summary = convert(a.src, a.dst, to=a.to or checks.format_of(a.dst), dtype=a.dtype, quant=a.quant,
                      max_shard_bytes=a.max_shard_size, console=con, quiet=a.quiet or not con.is_terminal,
                      requantize=a.requantize, force=a.force, lora=flags.lora_specs(a), base=a.base,
                      onnx_layout=a.onnx_layout, imatrix=a.imatrix)
    con.print(f"wrote {a.dst}: {summary.get('tensors', 0)} tensors, {summary.get('bytes_in', 0) / 1e6:.1f} MB in, "
              f"{summary.get('bytes_out', 0) / 1e6:.1f} MB out, {time.perf_counter() - t:.1f} s")
    for note in summary.get("notes", ()):
        con.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)
    return 0


def cmd_imatrix(a) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from kiln import imatrix, imatrix_file
    from kiln.driver import load_model
    from kiln.errors import KilnError
    if a.ctx < 16:
        raise KilnError(None, f"--ctx {a.ctx} is too small: llama.cpp leaves out batches under 16 tokens")
    if a.chunks is not None and a.chunks < 1:
        raise KilnError(None, f"--chunks {a.chunks}: give a positive number of windows")
    if os.path.isdir(a.output):
        raise KilnError(a.output, "is a folder: -o names the importance-matrix file to write")
    con = _console()
    t = time.perf_counter()
    model = load_model(a.model)
    ids = imatrix.tokenize(model, imatrix.read_text(a.text), a.text)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("windows"),
                  TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=con, transient=True,
                  disable=a.quiet or not con.is_terminal) as prog:
        task = prog.add_task(f"running {a.ctx}-token windows", total=None)

        def progress(done, total):
            prog.update(task, completed=done, total=total)
        im = imatrix.collect(model, ids, ctx=a.ctx, chunks=a.chunks, dataset=a.text, progress=progress)
    imatrix_file.write(a.output, im)
    con.print(f"wrote {a.output}: {len(im.entries)} matrices, {im.chunk_count} windows of {im.chunk_size} tokens "
              f"({len(ids)} in the text), {time.perf_counter() - t:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kiln", description="Compile, convert and run transformer language models.")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", help="describe a model file, folder or artifact")
    s.add_argument("model")
    s.add_argument("--graph", metavar="FILE", help="write the IR graph (.txt, .json, .dot or .graphml)")
    s.add_argument("--tensors", action="store_true",
                   help="also list every tensor: name, type, shape, bytes (an artifact: its files)")
    s.add_argument("--json", action="store_true", help="print the description as one JSON object (tensors included)")
    s.set_defaults(fn=cmd_inspect)

    s = sub.add_parser("compile", help="compile a model for a device")
    s.add_argument("model", help="Hugging Face or ONNX folder, .gguf, .safetensors or .onnx file, a model short name "
                                 "(" + ", ".join(_known_names()) + "; see kiln list), or a Hugging Face hub ID: "
                                 "org/name, org/name:Q4_K_M or org/name/FILE.gguf")
    s.add_argument("--target", default="cpu", help="cpu, cpu-avx2, cpu-avx512, cpu-neon, cuda, cuda-sm80/86/89/90, "
                                                   "metal (default: cpu = this host)")
    s.add_argument("--backend", choices=["onnxrt", "tvm"],
                   help="code generator (default: tvm where installed, else onnxrt; onnxrt builds a "
                        "portable model.onnx)")
    s.add_argument("--arch", help="CUDA architecture for --target cuda: sm80, sm86, sm89 or sm90")
    s.add_argument("--kv-dtype", choices=["f32", "f16"], default="f32",
                   help="KV-cache element type (f16: TVM backend, half the memory traffic at long context)")
    s.add_argument("-o", "--output", help="artifact folder (default: NAME.kiln)")
    s.add_argument("--force", action="store_true", help="replace an existing artifact at the output")
    s.add_argument("--verify", action="store_true", help="verify the IR after every pass")
    s.add_argument("--dump-ir", metavar="DIR", help="write the IR after each pass into DIR")
    s.add_argument("--quant", help="quantize a float model's weights: " + flags.QUANT_HELP)
    s.add_argument("--requantize", action="store_true", help="allow --quant on an already-quantized model")
    s.add_argument("--imatrix", metavar="FILE", help=flags.IMATRIX_HELP)
    flags.add_lora_flags(s)
    s.add_argument("--precision", choices=["exact", "fast"], default="exact",
                   help="exact: float32 products, equal to the reference interpreter (default); fast: "
                        "int8 activations in quantized matmuls, as llama.cpp computes")
    s.add_argument("-q", "--quiet", action="store_true")
    s.add_argument("--sign", metavar="KEYFILE", help="sign the manifest with this Ed25519 private key (PEM)")
    s.set_defaults(fn=cmd_compile)

    s = sub.add_parser("run", help="generate text with a compiled artifact")
    s.add_argument("artifact")
    s.add_argument("--prompt", "-p", help="prompt text (default: read standard input)")
    s.add_argument("--ids", metavar="1,2,3", help="prompt as token ids (no tokenizer needed); prints the new ids")
    s.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt "
                                                       "(with no --prompt on a terminal: a conversation, as kiln chat)")
    s.add_argument("--system", help="system message for --chat")
    flags.sampling_flags(s, max_new_tokens=128, n_help="tokens to generate at most",
                   c_help="tokens the prompt and the answer may hold together (default: the artifact's context)")
    s.add_argument("--stop", action="append", help="stop string (repeatable)")
    s.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (as transformers)")
    s.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam score = sum of log-probabilities / new tokens ** this (default 1.0)")
    s.add_argument("--early-stopping", nargs="?", const=True, default=False, type=flags.early_stopping,
                   metavar="never", help="end beam search once num-beams hypotheses finished "
                   "(or 'never': until none can improve)")
    s.add_argument("--num-return-sequences", type=int, default=1, help="beam hypotheses to print, best first")
    flags.threads_flag(s)
    flags.draft_flags(s)
    s.add_argument("-v", "--verbose", action="store_true", help="print timings after the answer")
    s.add_argument("--trusted-key", metavar="PUBFILE", action="append", help=flags.TRUSTED_KEY_HELP)
    s.set_defaults(fn=cmd_run)

    s = sub.add_parser("chat", help="talk with a compiled artifact in the terminal (history, /commands)",
                       description="An interactive conversation with ARTIFACT through its chat template. "
                                   "Type /help inside for the commands.")
    from kiln import chat_repl
    chat_repl.add_arguments(s)
    s.set_defaults(fn=cmd_chat)

    s = sub.add_parser("serve", help="serve an artifact over an OpenAI-compatible HTTP API")
    s.add_argument("artifact")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=int, default=8000, help="port to listen on")
    s.add_argument("--max-batch", type=int, default=8, help="requests generating at once (default 8)")
    s.add_argument("--max-queue", type=int, default=64, help="requests waiting for a row (default 64)")
    s.add_argument("--prefill-step-ms", type=flags.milliseconds, default=500, metavar="MS",
                   help="a long prompt is prefilled in chunks sized to take about this long each, so running "
                        "streams wait at most that between tokens (default 500; 0: always 256 tokens)")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health "
                                     "(default: $KILN_API_KEY, else none)")
    s.add_argument("--served-model-name", action="append", metavar="NAME",
                   help="a model id requests may name (repeatable; the first is the one /v1/models lists; "
                        "default: the artifact's folder name, and a known model's short name such as smollm2)")
    s.add_argument("--max-body-size", type=flags.size, default=4 << 20, metavar="SIZE",
                   help="refuse request bodies larger than this with 413, before reading the rest (default 4MiB)")
    s.add_argument("-c", "--ctx-size", type=int, metavar="N",
                   help="tokens one request may hold, prompt and answer together: a longer prompt is refused "
                        "(413 context_length_exceeded), max_tokens is cut to what fits (default: the artifact's "
                        "context)")
    s.add_argument("--read-timeout", type=flags.seconds, default=10.0, metavar="S",
                   help="close connections whose headers take longer than S seconds to arrive; "
                        "408 for a body that does (default 10)")
    flags.threads_flag(s)
    s.add_argument("--trusted-key", metavar="PUBFILE", action="append", help=flags.TRUSTED_KEY_HELP)
    flags.draft_flags(s, serving=True)
    s.add_argument("--shutdown-timeout", type=float, default=10.0, metavar="S",
                   help="on SIGTERM/SIGINT, let running streams go on this many seconds, then end them "
                        "(finish_reason length); a second signal ends them at once (default 10)")
    s.add_argument("--prefix-cache-mb", type=flags.megabytes, default=512, metavar="MB",
                   help="keep up to MB MiB of prompts' KV cache on the host, so requests that begin alike "
                        "(a system prompt, earlier turns) skip prefilling it again; 0 turns it off (default 512)")
    s.set_defaults(fn=cmd_serve)

    s = sub.add_parser("verify", help="check every file of an artifact against its sha256 in the manifest")
    s.add_argument("artifact")
    s.add_argument("--key", metavar="PUBFILE", action="append",
                   help="require a signature by this Ed25519 public key (repeatable: any of them)")
    s.set_defaults(fn=cmd_verify)

    s = sub.add_parser("eval", help="perplexity of a text, with a sliding window past the context")
    s.add_argument("artifact")
    s.add_argument("--text", required=True, help="a UTF-8 text file")
    s.add_argument("--window", "-c", "--ctx-size", dest="window", type=int, metavar="N",
                   help="tokens per window, as llama-perplexity's -c (default: the model's context)")
    s.add_argument("--stride", type=int, help="tokens between window starts (default: half a window)")
    s.add_argument("--max-tokens", type=int, help="score only the text's first N tokens")
    flags.threads_flag(s)
    s.add_argument("--json", action="store_true", help="also print the figures as JSON")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("bench", help="measure prefill and decode speed of an artifact")
    s.add_argument("artifact")
    s.add_argument("--prompt", default="The capital of France is", help="text the timed prompts are made of")
    s.add_argument("--prefill-tokens", type=int, default=130, help="prompt length of the prefill timing")
    s.add_argument("--decode-tokens", type=int, default=128, help="greedy steps per decode timing")
    s.add_argument("--repeats", type=int, default=2, help="runs per figure (the fastest counts)")
    s.add_argument("--context", type=flags.int_list, metavar="16,128,512,1000",
                   help="also time decoding with this many tokens already in the cache")
    s.add_argument("-c", "--ctx-size", type=int, metavar="N",
                   help="tokens the cache may hold: every timed run (the prefill, each prompt or --context "
                        "plus --decode-tokens) must fit, checked before timing starts (default: the "
                        "artifact's context)")
    flags.threads_flag(s)
    flags.draft_flags(s)
    s.add_argument("--json", action="store_true", help="also print the figures as JSON")
    s.add_argument("--plot", metavar="FILE.png",
                   help="draw decode tokens/s against context length (needs the plot extra)")
    s.add_argument("--peers-json", metavar="FILE", action="append",
                   help="benchmarks/decode_bench.py --json results (one --context each) to draw as more "
                        "lines on --plot (repeatable)")
    s.set_defaults(fn=cmd_bench)

    s = sub.add_parser("convert", help="convert a model between formats")
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("--to", choices=["hf", "gguf", "safetensors", "onnx"],
                   help="output format (default: from DST's suffix: .gguf, .safetensors or .onnx)")
    s.add_argument("--dtype", choices=["f32", "f16", "bf16"], help="element type of float tensors")
    s.add_argument("--quant", help="GGUF output: " + flags.QUANT_HELP)
    s.add_argument("--onnx-layout", choices=["optimum", "kiln"], default="optimum",
                   help="ONNX output: optimum's decoder inputs/outputs (input_ids, attention_mask, position_ids, "
                        "past_key_values.N.key/value -> logits, present.N.key/value) or kiln's (adds "
                        "logits_positions, the positions whose logits are computed)")
    s.add_argument("--requantize", action="store_true", help="allow --quant on an already-quantized model")
    s.add_argument("--imatrix", metavar="FILE", help=flags.IMATRIX_HELP)
    flags.add_lora_flags(s)
    s.add_argument("--base", metavar="MODEL",
                   help="SRC is a LoRA adapter: write it as llama.cpp's LoRA GGUF for this base model (--to gguf)")
    s.add_argument("--max-shard-size", type=flags.size, metavar="SIZE",
                   help="HF output: split safetensors above this size, e.g. 2GB or 500MB (default 2GB)")
    s.add_argument("--force", action="store_true",
                   help="replace an existing destination: only the files this conversion writes "
                        "(other files in a destination folder are kept)")
    s.add_argument("-q", "--quiet", action="store_true")
    flags.threads_flag(s)
    s.set_defaults(fn=cmd_convert)
    s = sub.add_parser("imatrix", help="an importance matrix for --quant --imatrix, from calibration text "
                                       "(llama.cpp's imatrix GGUF)")
    s.add_argument("model", help="Hugging Face folder or .gguf file")
    s.add_argument("--text", required=True, help="calibration text, a UTF-8 file")
    s.add_argument("-o", "--output", required=True, help="the importance matrix to write (.gguf)")
    s.add_argument("--ctx", type=int, default=512, help="tokens per window (default 512, as llama-imatrix)")
    s.add_argument("--chunks", type=int, help="use at most this many windows of the text")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(fn=cmd_imatrix)

    from kiln.embed_cli import add_parser as add_embed
    add_embed(sub)

    s = sub.add_parser("list", help="targets, backends, quantization types (bits per weight), model short names")
    s.set_defaults(fn=cmd_list)

    for command in sub.choices.values():
        command.formatter_class = checks.HelpFormatter
    return p


def _known_names() -> list[str]:
    from kiln.frontends.known_models import KNOWN
    return list(KNOWN)


def _version() -> str:
    from kiln import __version__
    return f"kiln {__version__}"


def _user_errors_of_the_runtime(fn):
    """The runtime may not import KilnError's users (frontends), so it raises ValueError and
    FileNotFoundError for bad artifacts and arguments: at the CLI those are the user's to fix."""
    def wrapped(a):
        from kiln.errors import KilnError
        try:
            return fn(a)
        except (ValueError, FileNotFoundError) as e:
            raise KilnError(None, checks.as_cli_advice(str(e))) from None
    return wrapped


def main(argv=None) -> int:
    from kiln.artifact import ArtifactError
    from kiln.errors import KilnError
    args = build_parser().parse_args(argv)
    from kiln.embed_cli import cmd_embed
    if args.fn in (cmd_run, cmd_chat, cmd_bench, cmd_serve, cmd_eval, cmd_embed):
        args.fn = _user_errors_of_the_runtime(args.fn)
    if argv is None:
        checks.note_interrupts()         # the process is ours (not a caller's in-process main([...]))
    try:
        return args.fn(args) or 0
    except KeyboardInterrupt:
        return checks.interrupt_exit()
    except (KilnError, ArtifactError) as e:
        if checks.interrupted:
            return checks.interrupt_exit()
        print(f"kiln: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    except Exception as e:                                    # noqa: BLE001 - last line of defence
        if checks.interrupted:
            return checks.interrupt_exit()
        if os.environ.get("KILN_DEBUG"):
            raise
        print(f"kiln: internal error: {e.__class__.__name__}: {e} (set KILN_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
