"""The command line's argument types and the flags several commands share (kept apart from
compiler/cli.py, which holds the commands themselves)."""
from __future__ import annotations

import argparse

QUANT_HELP = ("a block type for every matrix (q8_0, q4_0, q4_1, q5_0, q5_1, q2_k..q6_k) or a llama.cpp "
              "mixture (q4_k_m, q4_k_s, q5_k_m, q5_k_s, q3_k_s, q3_k_m, q3_k_l, q2_k_m, q6_k)")


TRUSTED_KEY_HELP = ("refuse the artifact unless its manifest is signed by this Ed25519 public key "
                    "(repeatable; default: the files in $KILN_TRUSTED_KEYS)")
IMATRIX_HELP = ("with --quant: an importance matrix (from kiln imatrix or llama-imatrix, GGUF or legacy .dat) "
                "that weights the quantizers' error, as llama-quantize --imatrix does")


def early_stopping(text: str):
    value = {"true": True, "false": False, "never": "never"}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true, false or never, got {text!r}")
    return value


def int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated counts, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected counts of at least 1, got {text!r}")
    return values


def id_list(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"--ids: expected comma-separated token ids, got {text!r}") from None
    if not ids:
        raise ValueError("--ids: no token ids given")
    return ids


def _number(text: str, ok, what: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not ok(v):
        raise argparse.ArgumentTypeError(f"not a number of {what}: {text!r}")
    return v


def seconds(text: str) -> float:
    return _number(text, lambda v: 0 < v < 1e6, "seconds")


def milliseconds(text: str) -> float:
    """A duration in ms, 0 allowed (it turns the feature off)."""
    return _number(text, lambda v: 0 <= v < 1e9, "milliseconds")


def lora_specs(a) -> list[tuple[str, float]]:
    """--lora PATH (repeatable) with --lora-scale S given once for all or once per adapter."""
    from kiln.errors import KilnError
    paths, scales = a.lora or [], a.lora_scale or []
    if scales and not paths:
        raise KilnError(None, "--lora-scale needs --lora ADAPTER")
    if len(scales) not in (0, 1, len(paths)):
        raise KilnError(None, f"{len(scales)} --lora-scale values for {len(paths)} adapters: give one for all, "
                              f"or one per --lora")
    if len(scales) <= 1:
        scales = (scales or [1.0]) * len(paths)
    return list(zip(paths, scales))


def add_lora_flags(s) -> None:
    s.add_argument("--lora", action="append", metavar="ADAPTER",
                   help="merge a LoRA adapter (PEFT folder or llama.cpp LoRA GGUF) into the weights; repeatable")
    s.add_argument("--lora-scale", action="append", type=float, metavar="S",
                   help="scale of the adapter's change (default 1; once for all adapters or once per --lora)")


def size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for unit, mult in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(unit):
            t, m = t[: -len(unit)], mult
            break
    else:
        m = 1
    try:
        n = int(float(t) * m)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 2GB or 500MB)") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return n


def megabytes(text: str) -> float:
    """A number of MiB >= 0 (0: the thing it sizes is off)."""
    return _number(text, lambda v: 0 <= v < 1e7, "MiB >= 0")


def sampling_flags(s, *, max_new_tokens: int, n_help: str, c_help: str) -> None:
    """The generation flags kiln run and kiln chat share, spelled as llama.cpp's where they overlap."""
    s.add_argument("-n", "--max-new-tokens", "--n-predict", dest="max_new_tokens", type=int,
                   default=max_new_tokens, metavar="N", help=n_help)
    s.add_argument("-c", "--ctx-size", type=int, metavar="N", help=c_help)
    s.add_argument("--temperature", "--temp", type=float, default=0.0, help="sampling temperature; 0 is greedy")
    s.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens only (0: all)")
    s.add_argument("--top-p", type=float, default=1.0, help="sample from the likeliest tokens holding this probability")
    s.add_argument("--min-p", type=float, default=0.0, help="drop tokens below this fraction of the likeliest one's probability")
    s.add_argument("--repetition-penalty", type=float, default=1.0, help="divide the logits of tokens already seen by this")
    s.add_argument("--seed", type=int, help="random seed for sampling")


def threads_flag(s) -> None:
    s.add_argument("-t", "--threads", type=int, metavar="N", help="CPU threads (default: one per core)")


def draft_flags(s, serving: bool = False) -> None:
    """Speculative decoding's flags (kiln run, kiln bench, kiln serve)."""
    s.add_argument("--draft", metavar="ARTIFACT", help="a smaller artifact with the same tokenizer proposes tokens "
                   "that the model checks in one run (speculative decoding: the model's own output, faster)"
                   + ("; while one request runs alone" if serving else ""))
    s.add_argument("--draft-tokens", type=int, default=4, metavar="K", help="tokens the draft proposes a round (default 4)")
