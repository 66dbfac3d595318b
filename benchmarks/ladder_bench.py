#!/usr/bin/env python3
"""Decode and prefill speed against model size: kiln exact and fast beside the peers, one
``decode_bench.py`` run per rung of the ladder ``make_ladder.py`` writes.

    python benchmarks/ladder_bench.py --models models/ --type q4_0 --sizes 1b,3b,8b -o ladder/ \\
        [--llama-cpp-python PY] [--oga 1b=DIR ...] [--oga-python PY] [--repeats 3] [--tokens 64]

For each size it takes the rung's GGUF from --models (llama.cpp's own file,
``llama-<size>-<type>-llamacpp.gguf``, where there is one; else kiln's ``llama-<size>-<type>.gguf``;
else the random-blocks ``llama-<size>-<type>-random.gguf``), compiles it twice with kiln's
default backend (``--precision exact`` and ``fast``; compile time and peak memory are recorded),
and runs ``decode_bench.py`` on both artifacts with llama.cpp on the same GGUF (and
onnxruntime-genai where --oga names a folder for that size). Everything lands in the output
folder: the artifacts, each rung's ``decode_bench`` JSON, ``ladder.json`` (all of it),
``ladder.md`` (the table README shows) and ``ladder.png`` (decode and prefill tokens/s against
parameters, one line per engine).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# parameters of make_ladder.py's shapes (tied head, SmolLM2's 49,152-token vocabulary)
PARAMS = {"1b": 1.07e9, "3b": 2.97e9, "8b": 7.18e9}


def rung_gguf(models: Path, size: str, qtype: str) -> Path:
    for suffix in ("-llamacpp", "", "-random"):
        path = models / f"llama-{size}-{qtype}{suffix}.gguf"
        if path.is_file():
            return path
    raise SystemExit(f"ladder_bench: no llama-{size}-{qtype}[-llamacpp|-random].gguf in {models} "
                     f"(make it with benchmarks/make_ladder.py)")


def compile_artifact(gguf: Path, out: Path, precision: str) -> dict:
    """kiln compile with the default backend; wall seconds and peak RSS from /usr/bin/time."""
    kiln = Path(sys.executable).with_name("kiln")
    cmd = [str(kiln), "compile", str(gguf), "-o", str(out), "--precision", precision, "--force", "-q"]
    timed = ["/usr/bin/time", "-f", "%e %M"] + cmd if Path("/usr/bin/time").is_file() else cmd
    print("  $ " + " ".join(cmd), flush=True)
    t = time.perf_counter()
    done = subprocess.run(timed, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t
    if done.returncode:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"ladder_bench: compiling {gguf} ({precision}) failed")
    peak = None
    match = re.search(r"^([\d.]+) (\d+)\s*$", done.stderr, re.M)
    if match:
        peak = int(match.group(2)) / 1024
    return {"compile_s": round(wall, 1), "compile_peak_mb": peak and round(peak)}


def bench_rung(size: str, gguf: Path, out: Path, a: argparse.Namespace) -> dict:
    arts, builds = [], {}
    for precision in ("exact", "fast"):
        art = out / f"llama-{size}-{a.type}-{precision}.kiln"
        if not (a.reuse and art.is_dir()):
            builds[precision] = compile_artifact(gguf, art, precision)
        arts.append(str(art))
    result = out / f"decode-{size}-{a.type}.json"
    cmd = [sys.executable, str(HERE / "decode_bench.py"), *arts, "--gguf", str(gguf),
           "--repeats", str(a.repeats), "--tokens", str(a.tokens), "--threads", str(a.threads),
           "--json", str(result)]
    if a.llama_cpp_python:
        cmd += ["--llama-cpp-python", a.llama_cpp_python]
    if size in a.oga:
        cmd += ["--oga", a.oga[size]] + (["--oga-python", a.oga_python] if a.oga_python else [])
    print("  $ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    rows = json.loads(result.read_text())["rows"]
    return {"size": size, "params": PARAMS[size], "gguf": gguf.name,
            "gguf_mb": round(gguf.stat().st_size / 2**20), "builds": builds, "rows": rows}


def engine_label(row: dict) -> str:
    name = row["engine"]
    if name == "kiln":
        return "kiln exact"
    if name.startswith("kiln "):
        return "kiln fast" if "fast" in name else name
    return name


def write_table(rungs: list[dict], path: Path) -> None:
    lines = ["| size | GGUF | engine | prefill tok/s | decode tok/s | decode ÷ llama.cpp | peak RSS MB |",
             "|---|---|---|---|---|---|---|"]
    for rung in rungs:
        llama = next((r["decode_tokens_per_s"] for r in rung["rows"] if r["engine"] == "llama.cpp"), None)
        for row in rung["rows"]:
            ratio = f"{row['decode_tokens_per_s'] / llama:.2f}×" if llama else ""
            lines.append(f"| {rung['size']} ({rung['params'] / 1e9:.2f}B) | {rung['gguf']} ({rung['gguf_mb']} MB) "
                         f"| {engine_label(row)} | {row['prefill_tokens_per_s']:.1f} "
                         f"| {row['decode_tokens_per_s']:.2f} | {ratio} | {row['peak_rss_mb']:.0f} |")
    path.write_text("\n".join(lines) + "\n")


def write_plot(rungs: list[dict], path: Path, note: str) -> None:
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure
    fig = Figure(figsize=(10, 4.5), dpi=100)
    axes = fig.subplots(1, 2)
    for ax, key, title in ((axes[0], "decode_tokens_per_s", "decode"),
                           (axes[1], "prefill_tokens_per_s", "prefill (130-token prompt)")):
        lines: dict[str, list[tuple[float, float]]] = {}
        for rung in rungs:
            for row in rung["rows"]:
                lines.setdefault(engine_label(row), []).append((rung["params"] / 1e9, row[key]))
        for name, points in lines.items():
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", label=name)
            for x, y in zip(xs, ys):
                ax.annotate(f"{y:.3g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks([r["params"] / 1e9 for r in rungs], [f"{r['params'] / 1e9:.2f}B" for r in rungs])
        ax.minorticks_off()
        ax.set_xlabel("parameters")
        ax.set_ylabel("tokens/s")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.text(0.01, 0.01, note, fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--models", type=Path, default=Path("models"), help="make_ladder.py's folder")
    ap.add_argument("--type", default="q4_0", help="quant type or mixture of the rungs' files (default q4_0)")
    ap.add_argument("--sizes", default="1b,3b,8b")
    ap.add_argument("-o", "--out", type=Path, default=Path("ladder"))
    ap.add_argument("--llama-cpp-python", default=os.environ.get("KILN_LLAMA_CPP_PYTHON"))
    ap.add_argument("--oga", action="append", default=[], metavar="SIZE=DIR",
                    help="onnxruntime-genai's folder for one size (repeatable)")
    ap.add_argument("--oga-python", default=os.environ.get("KILN_OGA_PYTHON"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reuse", action="store_true", help="keep artifacts already in the output folder")
    ap.add_argument("--replot", action="store_true",
                    help="only redraw ladder.md and ladder.png from the output folder's ladder.json")
    a = ap.parse_args()
    sizes = [s for s in a.sizes.split(",") if s]
    unknown = [s for s in sizes if s not in PARAMS]
    if unknown:
        ap.error(f"unknown size {unknown[0]!r} (choose from {', '.join(PARAMS)})")
    a.oga = dict(item.split("=", 1) for item in a.oga)
    a.out.mkdir(parents=True, exist_ok=True)
    rungs = []
    if a.replot:
        rungs = json.loads((a.out / "ladder.json").read_text())
    for size in [] if a.replot else sizes:
        gguf = rung_gguf(a.models, size, a.type)
        print(f"ladder_bench: {size} from {gguf}", flush=True)
        rungs.append(bench_rung(size, gguf, a.out, a))
        (a.out / "ladder.json").write_text(json.dumps(rungs, indent=1))
    write_table(rungs, a.out / "ladder.md")
    from kiln.benchplot import machine
    write_plot(rungs, a.out / "ladder.png",
               f"{machine()}, {a.threads} threads, median of {a.repeats} runs, {a.tokens} decode steps; "
               f"{a.type} GGUFs from benchmarks/make_ladder.py")
    print((a.out / "ladder.md").read_text())
    print(f"wrote {a.out / 'ladder.json'}, {a.out / 'ladder.md'}, {a.out / 'ladder.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
