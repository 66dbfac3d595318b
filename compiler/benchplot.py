"""``kiln bench --plot``: decode tokens/s against context length, kiln beside its peers.

kiln's line is the run's own ``--context`` rows; peers come from the JSON files
``benchmarks/decode_bench.py --json`` writes (one ``--context`` per file; a file holds every
engine of that run, kiln included), one line per engine over all the files given.
matplotlib (the ``plot`` extra) is imported only here, with the Agg backend: no display.
"""
from __future__ import annotations

from pathlib import Path

from kiln.errors import KilnError, load_json_object

__all__ = ["read_peer_runs", "plot_decode", "machine"]

#: The picture's size in pixels: FIGSIZE inches at DPI.
FIGSIZE, DPI = (8.0, 5.0), 100


def machine() -> str:
    """The CPU's model name and core count, for the note under a picture."""
    import os
    import platform

    from kiln.runtime.cpu_features import host_model
    name = host_model() or platform.processor() or platform.machine()
    return f"{name} ({os.cpu_count()} cores)"


def read_peer_runs(paths) -> dict[str, dict[int, float]]:
    """engine -> {context: decode tokens/s} from decode_bench.py JSON files. kiln's rows there
    are named ``kiln (decode_bench.py)``, to tell them from the line of the bench run itself."""
    lines: dict[str, dict[int, float]] = {}
    for path in paths:
        data = load_json_object(path, unreadable="cannot read decode_bench.py results",
                                not_object="not decode_bench.py results (a JSON object)")
        ctx, rows = data.get("context"), data.get("rows")
        if not isinstance(ctx, int) or isinstance(ctx, bool) or ctx < 1:
            raise KilnError(path, "no context length: run decode_bench.py with --context N "
                                  "(the default, the prompt alone, has no fixed length)")
        if not isinstance(rows, list) or not rows:
            raise KilnError(path, "no rows of results")
        for row in rows:
            name = row.get("engine") if isinstance(row, dict) else None
            tps = row.get("decode_tokens_per_s") if isinstance(row, dict) else None
            if not isinstance(name, str) or isinstance(tps, bool) or not isinstance(tps, (int, float)) or tps <= 0:
                raise KilnError(path, f"a row without an engine name and a positive decode_tokens_per_s: {row!r}")
            if name.split()[0] == "kiln":
                name = f"{name} (decode_bench.py)"
            lines.setdefault(name, {})[ctx] = float(tps)
    return lines


def plot_decode(out, kiln: dict[int, float], peers: dict[str, dict[int, float]] | None = None, *,
                label: str = "kiln", title: str = "decode speed against context length",
                note: str = "") -> Path:
    """Write a PNG of tokens/s against tokens in the cache: ``kiln`` first, then a line per
    peer. ``note`` (machine, command) goes under the axes. Returns the path written."""
    try:
        import matplotlib
    except ImportError:
        raise KilnError(None, "plotting needs matplotlib: pip install 'kiln[plot]'") from None
    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    series = {label: kiln, **(peers or {})}
    if not any(series.values()):
        raise KilnError(None, "nothing to plot: no decode figures")
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    ax = fig.add_subplot()
    contexts = sorted({c for s in series.values() for c in s})
    for name, points in series.items():
        if points:
            xs = sorted(points)
            ax.plot(xs, [points[x] for x in xs], marker="o", linewidth=2.5 if name == label else 1.5,
                    label=name)
    ax.set_xscale("log")
    ax.set_xticks(contexts, [str(c) for c in contexts])
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.set_xlabel("tokens already in the KV cache")
    ax.set_ylabel("decode tokens/s (greedy, batch 1)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    if note:
        fig.text(0.01, 0.01, note, fontsize=7, color="0.35")
    fig.tight_layout(rect=(0, 0.04 if note else 0, 1, 1))
    out = Path(out)
    fig.savefig(out, format="png")
    return out
