"""Rope scaling and attention windows in GGUF files, both ways.

llama.cpp stores each rope scaling its own way, and kiln writes what llama.cpp's converter
writes (``convert_hf_to_gguf.py``; the key and tensor names are gguf-py's constants):

=============  ==========================================================================
linear         ``{arch}.rope.scaling.type = linear``, ``{arch}.rope.scaling.factor``
yarn           ``type = yarn``, ``factor``, ``original_context_length``, and the
               ``yarn_beta_fast`` / ``yarn_beta_slow`` / ``yarn_attn_factor`` the config sets
llama3         tensor ``rope_freqs.weight``: F32 [rotary_dim/2], the divisor of each frequency
longrope       tensors ``rope_factors_long.weight`` / ``rope_factors_short.weight`` and
               ``{arch}.rope.scaling.attn_factor``, ``original_context_length`` (phi3)
dynamic        nothing: llama.cpp has no dynamic NTK scaling
=============  ==========================================================================

Beside them kiln records the scaling as transformers states it, ``kiln.rope.scaling`` (a JSON
object; llama.cpp ignores keys it does not know), so a file read back gives the very config it
came from: llama3's low/high frequency factors, exact float64 values, dynamic scaling, and the
scalings an architecture's llama.cpp graph has no place for.

Reading, llama.cpp's keys and tensors are the file's truth (they are what llama.cpp runs; a
tool may have edited them): kiln's record is used when it rotates exactly as they do, or when
they say nothing; otherwise it is ignored. A ``rope_freqs.weight`` without kiln's record (every
Llama 3.x GGUF converted by llama.cpp) is read as llama3 scaling when llama.cpp's defaults
(factors 1 and 4 over an original context of 8192) reproduce it, else as the factors themselves.
"""
from __future__ import annotations

import json
import math
import reprlib
from dataclasses import replace

import numpy as np

from kiln.errors import KilnError

from . import arch as A

KILN_KEY = "kiln.rope.scaling"
ROPE_FREQS = "rope_freqs.weight"
FACTORS_LONG = "rope_factors_long.weight"
FACTORS_SHORT = "rope_factors_short.weight"

# The llama.cpp graphs (src/models/*.cpp) of kiln's architectures that create these tensors;
# llama.cpp refuses a file that holds a tensor its graph does not create.
TAKES_ROPE_FREQS = {"llama"}
TAKES_LONGROPE = {"phi3"}
# Of kiln's architectures, the llama.cpp graphs that apply {arch}.attention.sliding_window:
# gemma2, gemma3 and gpt-oss (on their sliding layers); llama, qwen2, qwen3 and gemma do not read it,
# phi3 reads it and switches it off.
APPLIES_WINDOW = {"gemma2", "gemma3", "gpt-oss"}

# yarn's parameters as transformers names them -> llama.cpp's key suffix, and its defaults
_YARN_KEYS = (("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow"), ("attention_factor", "yarn_attn_factor"))


def short_float(x) -> float:
    """A float32 from the file as the shortest decimal that rounds to it (1.1, not
    1.100000023841858), so config values come back as they were written."""
    return float(str(np.float32(x)))


# ---- writing --------------------------------------------------------------------------------

def for_gguf(cfg: A.ArchConfig, arch: str) -> tuple[dict, dict[str, np.ndarray], list[str]]:
    """(metadata, extra F32 tensors by name, notes on what llama.cpp will ignore or approximate)."""
    from .gguf_file import typed
    meta: dict = {}
    tensors: dict[str, np.ndarray] = {}
    notes: list[str] = []
    scaling = dict(cfg.rope_scaling or {})
    kind = A.rope_kind(scaling)
    p = f"{arch}.rope.scaling."
    if cfg.rotary_dim and kind != "default":
        meta[KILN_KEY] = json.dumps(scaling, sort_keys=True)
        if kind == "linear":
            meta[p + "type"] = "linear"
            meta[p + "factor"] = typed(float(scaling["factor"]), "float32")
            if scaling.get("original_max_position_embeddings"):
                meta[p + "original_context_length"] = typed(int(scaling["original_max_position_embeddings"]), "uint32")
        elif kind == "yarn":
            factor = float(scaling["factor"])
            meta[p + "type"] = "yarn"
            meta[p + "factor"] = typed(factor, "float32")
            meta[p + "original_context_length"] = typed(
                int(scaling.get("original_max_position_embeddings") or cfg.max_position_embeddings), "uint32")
            defaults = {"beta_fast": 32.0, "beta_slow": 1.0,
                        "attention_factor": 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0}
            unusual = []
            for hf_key, suffix in _YARN_KEYS:
                if scaling.get(hf_key) is not None:
                    meta[p + suffix] = typed(float(scaling[hf_key]), "float32")
                    if not math.isclose(float(scaling[hf_key]), defaults[hf_key], rel_tol=1e-6):
                        unusual.append(f"{hf_key} {scaling[hf_key]}")
            if unusual:
                notes.append(f"llama.cpp's {arch} graph does not read {p}yarn_*: it runs yarn with beta_fast 32, "
                             f"beta_slow 1 and attention factor 0.1*ln(factor)+1, not this model's {', '.join(unusual)}")
            if scaling.get("truncate") is False:
                notes.append(f"llama.cpp rounds yarn's correction range to whole dimensions (transformers' truncate "
                             f"true), not this model's truncate false (kiln keeps it in {KILN_KEY})")
        elif kind in ("llama3", "freq_factors"):
            if arch in TAKES_ROPE_FREQS:
                tensors[ROPE_FREQS] = A.rope_freq_factors(cfg)
            else:
                notes.append(f"llama.cpp's {arch} graph takes no rope_freqs tensor, so llama.cpp will run this "
                             f"model's {kind} rope scaling as plain rotary (kiln keeps it in {KILN_KEY})")
        elif kind == "longrope":
            short = scaling.get("short_factor") or scaling.get("long_factor")
            long = scaling.get("long_factor") or short
            orig = int(scaling.get("original_max_position_embeddings") or cfg.max_position_embeddings)
            if arch in TAKES_LONGROPE:
                n = cfg.rotary_dim // 2
                tensors[FACTORS_LONG] = np.asarray(long, dtype=np.float32).reshape(n)
                tensors[FACTORS_SHORT] = np.asarray(short, dtype=np.float32).reshape(n)
                meta[p + "original_context_length"] = typed(orig, "uint32")
                meta[p + "attn_factor"] = typed(A.rope_attention_factor(cfg), "float32")
                if scaling.get("long_factor") and long != short:
                    notes.append(f"llama.cpp picks longrope's factors once per context, the long ones whenever "
                                 f"n_ctx exceeds {orig}; kiln and transformers switch per sequence, to the long "
                                 f"ones once it passes {orig} tokens")
            else:
                notes.append(f"llama.cpp's {arch} graph takes no longrope factor tensors, so llama.cpp will run "
                             f"this model's longrope scaling as plain rotary (kiln keeps it in {KILN_KEY})")
        elif kind == "dynamic":
            notes.append(f"llama.cpp has no dynamic NTK rope scaling and runs plain rotary: the same as dynamic "
                         f"scaling within the trained context ({cfg.max_position_embeddings} positions), "
                         f"different past it (kiln keeps the setting in {KILN_KEY})")
    if cfg.sliding_window:
        window = int(cfg.sliding_window)
        meta[f"{arch}.attention.sliding_window"] = typed(window, "uint32")
        if arch not in APPLIES_WINDOW:
            notes.append(f"llama.cpp's {arch} graph ignores {arch}.attention.sliding_window ({window}) and attends "
                         f"to the whole context: its outputs differ from kiln's and transformers' once a "
                         f"sequence passes {window} tokens")
    return meta, tensors, notes


# ---- reading --------------------------------------------------------------------------------

def from_gguf(meta: dict, tensors: dict, cfg: A.ArchConfig, arch: str, path) -> dict:
    """The rope scaling of a GGUF file, as kiln's config holds it (transformers' form)."""
    if not cfg.rotary_dim:
        return {}
    found = _llama_cpp_scaling(meta, tensors, cfg, arch, path)
    raw = meta.get(KILN_KEY)
    if raw is not None:
        recorded = _record(raw, path)
        if not found:
            return recorded
        if A.rope_kind(found) == "yarn" and "truncate" in recorded:
            found = {**found, "truncate": recorded["truncate"]}     # no llama.cpp key states it
        try:
            agree = A.same_rotary(replace(cfg, rope_scaling=recorded), replace(cfg, rope_scaling=found))
        except (KeyError, TypeError, ValueError, ArithmeticError):
            agree = False
        if agree:
            return recorded
    if A.rope_kind(found) == "freq_factors":
        return _as_llama3(found, meta, cfg, arch) or found
    return found


def _record(raw, path) -> dict:
    try:
        value = json.loads(raw) if isinstance(raw, str) else None
    except (ValueError, RecursionError):      # not JSON, nested too deeply, a 5000-digit number
        value = None
    if not isinstance(value, dict):
        raise KilnError(path, f"metadata key {KILN_KEY} is not a JSON object")
    return value


def _llama_cpp_scaling(meta: dict, tensors: dict, cfg: A.ArchConfig, arch: str, path) -> dict:
    """What llama.cpp makes of the file's rope keys and tensors, in transformers' terms."""
    p = f"{arch}.rope.scaling."

    def number(suffix, default=None):
        v = meta.get(p + suffix, default)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise KilnError(path, f"metadata key {p}{suffix} is {reprlib.repr(v)}, not a number")
        return v

    def vector(name):
        w, n = tensors[name], cfg.rotary_dim // 2
        if tuple(w.shape) != (n,):
            raise KilnError(path, f"tensor {name} has shape {list(w.shape)}; the rotary dimension "
                                  f"{cfg.rotary_dim} implies [{n}]")
        v = np.asarray(w.numpy(), dtype=np.float64).reshape(n)
        if not (np.isfinite(v).all() and (v > 0).all()):
            raise KilnError(path, f"tensor {name} holds a factor that is not a positive number")
        return [short_float(x) for x in v]

    factor = number("factor")
    stype = meta.get(p + "type", "linear" if factor else "none")   # llama.cpp's default is linear
    if not isinstance(stype, str):
        raise KilnError(path, f"metadata key {p}type is not a string")
    orig = number("original_context_length")
    attn = number("attn_factor")
    has_longrope = FACTORS_LONG in tensors or FACTORS_SHORT in tensors
    if attn is not None and not has_longrope and not math.isclose(attn, 1.0, rel_tol=1e-6):
        raise KilnError(path, f"metadata key {p}attn_factor is {attn} without longrope factor tensors; "
                              f"kiln reads an attention factor only with them")
    if ROPE_FREQS in tensors:
        factors = vector(ROPE_FREQS)
        if stype == "linear" and factor and factor != 1:
            # llama.cpp applies both: theta / (factor * rope_freqs[i])
            factors = [short_float(np.float32(f) * np.float32(factor)) for f in factors]
        elif stype not in ("none", "linear"):
            raise KilnError(path, f"{ROPE_FREQS} with {p}type {stype} is not supported")
        return {"rope_type": "freq_factors", "freq_factors": factors}
    if has_longrope:
        short = vector(FACTORS_SHORT) if FACTORS_SHORT in tensors else vector(FACTORS_LONG)
        long = vector(FACTORS_LONG) if FACTORS_LONG in tensors else short
        found = {"rope_type": "longrope", "long_factor": long, "short_factor": short,
                 "original_max_position_embeddings": int(orig or cfg.max_position_embeddings)}
        if attn is not None:
            try:
                default = A.rope_attention_factor(replace(cfg, rope_scaling=found))
            except (ValueError, ArithmeticError) as e:
                raise KilnError(path, f"rope scaling 'longrope' has bad parameters ({e})") from None
            if not math.isclose(attn, default, rel_tol=1e-6):
                found["attention_factor"] = short_float(attn)
        return found
    if stype == "none" or (stype == "linear" and factor in (None, 0, 1)) or stype == "longrope":
        return {}
    if stype == "linear":
        found = {"rope_type": "linear", "factor": short_float(factor)}
        if orig:
            found["original_max_position_embeddings"] = int(orig)
        return found
    if stype == "yarn":
        if not factor:
            raise KilnError(path, f"yarn rope scaling without metadata key {p}factor")
        found = {"rope_type": "yarn", "factor": short_float(factor),
                 "original_max_position_embeddings": int(orig or cfg.max_position_embeddings)}
        for hf_key, suffix in _YARN_KEYS:
            if (v := number(suffix)) is not None:
                found[hf_key] = short_float(v)
        return found
    raise KilnError(path, f"rope scaling type {reprlib.repr(stype)} is not supported (metadata key {p}type; kiln reads "
                          f"none, linear, yarn and longrope)")


def _as_llama3(found: dict, meta: dict, cfg: A.ArchConfig, arch: str) -> dict | None:
    """llama3 parameters that reproduce a rope_freqs tensor, with llama.cpp's converter defaults."""
    factors = found["freq_factors"]
    factor = max(factors)
    if factor <= 1:
        return None
    orig = meta.get(f"{arch}.rope.scaling.original_context_length") or 8192
    guess = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": int(orig)}
    try:
        same = A.same_rotary(replace(cfg, rope_scaling=guess), replace(cfg, rope_scaling=found))
    except (KeyError, TypeError, ValueError, ArithmeticError):
        return None
    return guess if same else None
