"""Tokenizers on the conversion side: GGUF tokenizer metadata <-> ``tokenizers`` <-> HF folder.

Three entry points, all built around :class:`TokenizerSpec` (a ``tokenizers.Tokenizer`` plus
the facts a runtime needs: special ids, whether to add BOS/EOS, the chat template):

* :func:`from_gguf_metadata` -- a plain dict of GGUF key/values (``tokenizer.ggml.*``) to a spec.
  The GGUF reader is not touched here; any reader that yields Python values works.
* :func:`from_hf_folder` -- a Hugging Face folder (tokenizer.json + tokenizer_config.json ...).
* :func:`to_gguf_metadata` -- a spec back to the ``tokenizer.ggml.*`` keys llama.cpp reads.

``TokenizerSpec.save(folder)`` writes ``tokenizer.json`` and ``tokenizer_config.json``, which both
``transformers`` (as ``PreTrainedTokenizerFast``) and ``kiln.runtime.tokenizer.Tokenizer`` load.

How GGUF vocabularies map onto ``tokenizers`` (behaviour follows llama.cpp's llama-vocab.cpp):

* ``gpt2`` (byte-level BPE): a BPE model over the GGUF token strings and merges; the
  ``tokenizer.ggml.pre`` name picks the pre-tokenizer regexes (applied in sequence, each one
  splitting the pieces the previous produced, matches and gaps both kept) followed by the
  byte-level mapping.
* ``llama`` (SentencePiece BPE with scores): a BPE model with ``byte_fallback`` (tokens
  ``<0x00>``..``<0xFF>``) whose merges are derived from the scores -- llama.cpp merges the adjacent
  pair whose concatenation has the highest score, so every split ``a + b`` of a normal token
  becomes a merge ranked by that token's score. Spaces become ``▁``; ``add_space_prefix``
  prepends one to each stretch of text (also after a special token, as llama.cpp does).
* Token types: CONTROL and UNKNOWN tokens become special added tokens (matched whole in the
  input, dropped by ``decode(skip_special_tokens=True)``); USER_DEFINED tokens become non-special
  added tokens (matched whole, always decoded).
"""
from __future__ import annotations

import json
import os
import reprlib
import warnings
from dataclasses import dataclass, field

from tokenizers import Tokenizer

from kiln.errors import KilnError, load_json_object
from kiln.runtime.tokenizer import pick_template, read_chat_template

from .pretokenizers import PRE_TOKENIZERS, _pre_info, _pre_name_from_json

__all__ = [
    "TokenizerSpec", "from_gguf_metadata", "from_hf_folder", "to_gguf_metadata",
    "TOKEN_NORMAL", "TOKEN_UNKNOWN", "TOKEN_CONTROL", "TOKEN_USER_DEFINED", "TOKEN_UNUSED",
    "TOKEN_BYTE", "PRE_TOKENIZERS",
]

# GGUF token types (llama.cpp's llama_token_type; gguf-py's TokenType).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

SPIECE_SPACE = "\u2581"  # '▁'

# --------------------------------------------------------------------------------------------
# The spec
# --------------------------------------------------------------------------------------------

@dataclass
class TokenizerSpec:
    """A tokenizer and what a runtime needs to use it.

    ``gguf_model``/``gguf_pre``/``scores``/``token_types`` keep GGUF facts that a tokenizer.json
    cannot hold, so that GGUF -> spec -> GGUF is exact within one process; when they are None,
    :func:`to_gguf_metadata` derives them from the tokenizer.
    """

    tokenizer: Tokenizer
    bos_id: int | None = None
    eos_ids: list = field(default_factory=list)
    pad_id: int | None = None
    unk_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None
    model_max_length: int | None = None
    add_space_prefix: bool | None = None
    gguf_model: str | None = None
    gguf_pre: str | None = None
    scores: list | None = None
    token_types: list | None = None

    @property
    def eos_id(self) -> int | None:
        return self.eos_ids[0] if self.eos_ids else None

    def token(self, i: int | None) -> str | None:
        return None if i is None else self.tokenizer.id_to_token(i)

    def tokenizer_config(self) -> dict:
        """The tokenizer_config.json contents (Hugging Face keys, plus ``eos_token_ids``)."""
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.token(self.bos_id),
            "eos_token": self.token(self.eos_id),
            "pad_token": self.token(self.pad_id),
            "unk_token": self.token(self.unk_id),
            "add_bos_token": bool(self.add_bos),
            "add_eos_token": bool(self.add_eos),
            "clean_up_tokenization_spaces": False,
        }
        if self.model_max_length:
            cfg["model_max_length"] = int(self.model_max_length)
        if self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
        if len(self.eos_ids) > 1:
            cfg["eos_token_ids"] = [int(i) for i in self.eos_ids]  # not an HF key; kiln's runtime reads it
        return cfg

    def save(self, folder) -> None:
        """Write tokenizer.json and tokenizer_config.json into ``folder`` (created if needed)."""
        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        # written by Python (not the library's own save), so a full disk is an OSError like any other
        with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
            f.write(self.tokenizer.to_str(pretty=True))
        with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(self.tokenizer_config(), f, indent=2, ensure_ascii=False)
            f.write("\n")


# --------------------------------------------------------------------------------------------
# GGUF -> spec
# --------------------------------------------------------------------------------------------

def _seq(meta: dict, key: str, kind, required=False):
    v = meta.get(key)
    if v is None:
        if required:
            raise KilnError(None, f"GGUF metadata has no {key}")
        return None
    if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
        raise KilnError(None, f"GGUF metadata {key} should be an array, got {type(v).__name__}")
    out = []
    for i, x in enumerate(v):
        try:
            if kind is str:
                out.append(x.decode("utf-8") if isinstance(x, (bytes, bytearray)) else str(x))
            else:
                out.append(_convert(x, kind))
        except (UnicodeDecodeError, ValueError, TypeError, OverflowError):
            raise KilnError(None, f"GGUF metadata {key} has a malformed entry {reprlib.repr(x)}") from None
        if kind is str and _has_surrogates(out[-1]):
            # the GGUF reader keeps bytes that are not UTF-8 as surrogates; text cannot hold them
            raise KilnError(None, f"GGUF metadata {key}[{i}] is not valid UTF-8: {reprlib.repr(out[-1])}")
    return out


def _convert(v, kind):
    """``kind(v)``, except that a float is an int only when it is a whole number (not 2.5, inf)."""
    if kind is int and isinstance(v, float) and not v.is_integer():
        raise ValueError(f"{v} is not a whole number")
    return kind(v)


def _scalar(meta: dict, key: str, kind, default=None):
    v = meta.get(key)
    if v is None:
        return default
    if isinstance(v, (list, tuple)) and len(v) == 1:
        v = v[0]
    if isinstance(v, (bytes, bytearray)):
        v = v.decode("utf-8", "replace")
    try:
        v = _convert(v, kind)
    except (TypeError, ValueError, OverflowError):
        raise KilnError(None, f"GGUF metadata {key} should be {kind.__name__}, got {reprlib.repr(v)}") from None
    if kind is str and _has_surrogates(v):
        raise KilnError(None, f"GGUF metadata {key} is not valid UTF-8: {reprlib.repr(v)}")
    return v


def from_gguf_metadata(meta: dict, path=None) -> TokenizerSpec:
    """Build a :class:`TokenizerSpec` from GGUF metadata values (a plain ``{key: value}`` dict).

    ``path``, the file the metadata came from, is named in every error."""
    try:
        return _from_gguf_metadata(meta)
    except KilnError as e:
        if e.path is None and path is not None:
            raise KilnError(path, e.message) from None
        raise


def _from_gguf_metadata(meta: dict) -> TokenizerSpec:
    model = _scalar(meta, "tokenizer.ggml.model", str)
    if model is None:
        raise KilnError(None, "GGUF metadata has no tokenizer.ggml.model")
    if model not in ("gpt2", "llama"):
        raise KilnError(None, f"GGUF tokenizer model {reprlib.repr(model)} is not supported (kiln reads 'gpt2' and 'llama')")
    tokens = _seq(meta, "tokenizer.ggml.tokens", str, required=True)
    n = len(tokens)
    if n == 0:
        raise KilnError(None, "GGUF metadata tokenizer.ggml.tokens is empty")
    types = _seq(meta, "tokenizer.ggml.token_type", int)
    if types is not None and len(types) != n:
        raise KilnError(None, f"GGUF tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")
    scores = _seq(meta, "tokenizer.ggml.scores", float)
    if scores is not None and len(scores) != n:
        raise KilnError(None, f"GGUF tokenizer.ggml.scores has {len(scores)} entries for {n} tokens")
    if types is None:
        types = [TOKEN_NORMAL] * n
    tokens = list(tokens)
    for i, t in enumerate(tokens):
        if t == "":
            warnings.warn(f"GGUF token {i} is empty; named [EMPTY_{i}] as llama.cpp does", stacklevel=3)
            tokens[i] = f"[EMPTY_{i}]"
    vocab = {}
    for i, t in enumerate(tokens):
        if t in vocab:
            raise KilnError(None, f"GGUF vocabulary has token {reprlib.repr(t)} twice (ids {vocab[t]} and {i})")
        vocab[t] = i

    def special_id(key, default=None):
        v = _scalar(meta, key, int)
        if v is None:
            return default
        if not 0 <= v < n:
            warnings.warn(f"GGUF {key} = {v} is outside the vocabulary of {n}; ignored", stacklevel=4)
            return default
        return v

    is_spm = model == "llama"
    pre_name = _scalar(meta, "tokenizer.ggml.pre", str)
    pre = None if is_spm else _pre_info(pre_name if pre_name is not None else "default")
    bos = special_id("tokenizer.ggml.bos_token_id", 1 if is_spm and n > 1 else None)
    eos = special_id("tokenizer.ggml.eos_token_id", 2 if is_spm and n > 2 else None)
    unk = special_id("tokenizer.ggml.unknown_token_id", 0 if is_spm else None)
    pad = special_id("tokenizer.ggml.padding_token_id")
    eos_ids = [i for i in (eos, special_id("tokenizer.ggml.eot_token_id"),
                           special_id("tokenizer.ggml.eom_token_id")) if i is not None]
    eos_ids = list(dict.fromkeys(eos_ids))
    add_bos = _scalar(meta, "tokenizer.ggml.add_bos_token", bool, True if is_spm else pre.add_bos)
    add_eos = _scalar(meta, "tokenizer.ggml.add_eos_token", bool, False)
    add_space_prefix = _scalar(meta, "tokenizer.ggml.add_space_prefix", bool, is_spm)

    def string(x):
        return {"String": x}

    if is_spm:
        if scores is None and meta.get("tokenizer.ggml.merges") is None:
            raise KilnError(None, "GGUF 'llama' tokenizer has neither tokenizer.ggml.scores nor merges")
        merges = (_parse_merges(meta) if meta.get("tokenizer.ggml.merges") is not None
                  else _merges_from_scores(tokens, scores, types, vocab))
        model_json = _bpe_json(vocab, _valid_merges(merges, vocab), byte_fallback=True, fuse_unk=True,
                               unk_token=tokens[unk] if unk is not None else None)
        normalizer = {"type": "Sequence", "normalizers":
                      ([{"type": "Prepend", "prepend": SPIECE_SPACE}] if add_space_prefix else [])
                      + [{"type": "Replace", "pattern": string(" "), "content": SPIECE_SPACE}]}
        pre_tokenizer = None
        decoder = {"type": "Sequence", "decoders":
                   [{"type": "Replace", "pattern": string(SPIECE_SPACE), "content": " "},
                    {"type": "ByteFallback"}, {"type": "Fuse"}]
                   + ([{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if add_space_prefix else [])}
    else:
        if meta.get("tokenizer.ggml.merges") is None:
            raise KilnError(None, "GGUF 'gpt2' tokenizer has no tokenizer.ggml.merges")
        model_json = _bpe_json(vocab, _valid_merges(_parse_merges(meta), vocab),
                               ignore_merges=pre.ignore_merges)
        normalizer = None
        pre_tokenizer = {"type": "Sequence", "pretokenizers":
                         [{"type": "Split", "pattern": {"Regex": rx}, "behavior": "Isolated", "invert": False}
                          for rx in pre.regexes]
                         + [{"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                             "use_regex": False}]}
        decoder = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}

    # CONTROL/UNKNOWN -> special added tokens; USER_DEFINED -> plain added tokens. Without token
    # types, at least the named special tokens are special.
    named = {bos, eos, unk} if meta.get("tokenizer.ggml.token_type") is None else set()
    added = []
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty in (TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED) or i in named:
            added.append({"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": ty != TOKEN_USER_DEFINED})
    tj = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
          "normalizer": normalizer, "pre_tokenizer": pre_tokenizer,
          "post_processor": _post_processor_json(tokens, bos if add_bos else None,
                                                 eos if add_eos else None, byte_level=not is_spm),
          "decoder": decoder, "model": model_json}
    try:
        tok = Tokenizer.from_str(json.dumps(tj, ensure_ascii=False))
    except BaseException as e:  # the tokenizers library raises a bare Exception, or panics
        if not _library_failure(e):
            raise
        raise KilnError(None, f"GGUF tokenizer cannot be built: {_first_line(e)}") from None
    _smoke_test(None, tok)

    arch = _scalar(meta, "general.architecture", str)
    ctx = _scalar(meta, f"{arch}.context_length", int) if arch else None
    return TokenizerSpec(
        tokenizer=tok, bos_id=bos, eos_ids=eos_ids, pad_id=pad, unk_id=unk,
        add_bos=bool(add_bos and bos is not None), add_eos=bool(add_eos and eos is not None),
        chat_template=_scalar(meta, "tokenizer.chat_template", str),
        model_max_length=ctx, add_space_prefix=bool(add_space_prefix), gguf_model=model,
        gguf_pre=pre_name, scores=scores, token_types=list(types))


def _parse_merges(meta: dict) -> list:
    out = []
    for m in _seq(meta, "tokenizer.ggml.merges", str):
        pair = _split_merge(m)
        if pair is None:
            raise KilnError(None, f"GGUF merge {reprlib.repr(m)} is not two tokens separated by a space")
        out.append(pair)
    return out


def _split_merge(m: str):
    pos = m.find(" ", 1)  # like llama.cpp: a space at index 0 belongs to the first part
    return None if pos < 0 else (m[:pos], m[pos + 1:])


def _valid_merges(merges: list, vocab: dict) -> list:
    ok = [(a, b) for a, b in merges if a in vocab and b in vocab and a + b in vocab]
    if len(ok) != len(merges):
        warnings.warn(f"{len(merges) - len(ok)} GGUF merges name tokens outside the vocabulary; "
                      "dropped", stacklevel=4)
    return ok


def _merges_from_scores(tokens, scores, types, vocab) -> list:
    """SentencePiece BPE as merges: every split of a normal token, best-scored token first."""
    if scores is None:
        scores = [0.0] * len(tokens)
    normal = {t: i for i, t in enumerate(tokens) if types[i] == TOKEN_NORMAL}
    found = []
    for t, i in normal.items():
        for k in range(1, len(t)):
            a, b = t[:k], t[k:]
            ia, ib = normal.get(a), normal.get(b)
            if ia is not None and ib is not None:
                found.append((-scores[i], i, ia, ib, a, b))
    found.sort()
    return [(a, b) for *_, a, b in found]


def _bpe_json(vocab, merges, *, byte_fallback=False, fuse_unk=False, unk_token=None, ignore_merges=False):
    return {"type": "BPE", "dropout": None, "unk_token": unk_token, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": fuse_unk, "byte_fallback": byte_fallback,
            "ignore_merges": ignore_merges, "vocab": vocab, "merges": [list(m) for m in merges]}


def _post_processor_json(tokens, bos: int | None, eos: int | None, byte_level: bool):
    """tokenizer.json's post_processor: byte-level offsets, and BOS/EOS when the model adds them.
    Written as JSON because the string template syntax cannot name tokens holding ':' or ' '."""
    procs = [{"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}] \
        if byte_level else []
    if bos is not None or eos is not None:
        def piece(i, type_id):
            return {"SpecialToken": {"id": tokens[i], "type_id": type_id}}

        def part(name, type_id):
            return ([piece(bos, type_id)] if bos is not None else []) + \
                [{"Sequence": {"id": name, "type_id": type_id}}] + \
                ([piece(eos, type_id)] if eos is not None else [])
        specials = {tokens[i]: {"id": tokens[i], "ids": [i], "tokens": [tokens[i]]}
                    for i in (bos, eos) if i is not None}
        procs.append({"type": "TemplateProcessing", "single": part("A", 0),
                      "pair": part("A", 0) + part("B", 1), "special_tokens": specials})
    if not procs:
        return None
    return procs[0] if len(procs) == 1 else {"type": "Sequence", "processors": procs}


# --------------------------------------------------------------------------------------------
# HF folder -> spec
# --------------------------------------------------------------------------------------------

def _read_json(path: str) -> dict:
    """The JSON object in ``path``; anything else is one KilnError naming the file."""
    return load_json_object(path, unreadable="not valid JSON", not_object="not a JSON object")


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _first_line(e: BaseException, limit: int = 160) -> str:
    lines = str(e).splitlines()
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _token_text(v):
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def _template_processors(tj: dict) -> list:
    """tokenizer.json's TemplateProcessing post-processors (alone or inside a Sequence)."""
    pp = tj.get("post_processor")
    if not isinstance(pp, dict):
        return []
    procs = pp.get("processors") if pp.get("type") == "Sequence" else [pp]
    return [p for p in (procs if isinstance(procs, list) else [])
            if isinstance(p, dict) and p.get("type") == "TemplateProcessing"]


def _special_of(piece):
    """The special token a template piece names, or None. The library takes the piece's fields as
    an object or, as serde allows for any struct, as a list ([id, type_id])."""
    sp = piece.get("SpecialToken") if isinstance(piece, dict) else None
    if isinstance(sp, dict):
        return sp.get("id")
    if isinstance(sp, list) and sp:
        return sp[0]
    return None


def _template_flags(tj: dict, bos_tok, eos_tok):
    """(adds_bos, adds_eos) according to tokenizer.json's TemplateProcessing, or (None, None)."""
    for p in _template_processors(tj):
        single = p.get("single") if isinstance(p.get("single"), list) else []
        first = _special_of(single[0]) if single else None
        last = _special_of(single[-1]) if single else None
        return (first is not None and first == bos_tok), (last is not None and last == eos_tok)
    return None, None


def from_hf_folder(folder) -> TokenizerSpec | None:
    """Read a Hugging Face tokenizer folder; None when it has no tokenizer.json."""
    folder = os.fspath(folder)
    tj_path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(tj_path):
        if os.path.isfile(os.path.join(folder, "tokenizer.model")):
            warnings.warn(f"{folder}: only a SentencePiece tokenizer.model, no tokenizer.json; "
                          "kiln reads tokenizer.json only, so the tokenizer is left out", stacklevel=2)
        return None
    tj = _read_json(tj_path)
    try:
        tok = Tokenizer.from_str(json.dumps(tj))
    except BaseException as e:  # the tokenizers library raises a bare Exception, or panics
        if not _library_failure(e):
            raise
        raise KilnError(tj_path, f"not a tokenizer the tokenizers library can load ({_first_line(e)})") from None
    _check_template_processing(tj_path, tj)
    _smoke_test(tj_path, tok)
    ids = tok.get_vocab(with_added_tokens=True).values()
    n_vocab = max(ids, default=-1) + 1
    if n_vocab > max(2 * len(ids), len(ids) + 65536):
        # GGUF (and every runtime table) lays tokens out by id: 2**31 would mean 2**31 entries
        raise KilnError(tj_path, f"token ids run up to {n_vocab - 1}, but there are only {len(ids)} tokens")

    def is_id(i) -> bool:       # ids from the config files name tokens: others are ignored
        return isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n_vocab

    def opt_json(name):
        p = os.path.join(folder, name)
        return _read_json(p) if os.path.isfile(p) else {}

    cfg = opt_json("tokenizer_config.json")
    stm = opt_json("special_tokens_map.json")
    gen = opt_json("generation_config.json")

    def tok_of(key):
        t = _token_text(cfg.get(key)) or _token_text(stm.get(key))
        return t

    def id_of(text):
        if text is None or _has_surrogates(text):     # a "\ud800" escape names no token
            return None
        return tok.token_to_id(text)

    bos_tok, eos_tok = tok_of("bos_token"), tok_of("eos_token")
    bos, eos = id_of(bos_tok), id_of(eos_tok)
    eos_ids = [eos] if eos is not None else []
    extra = cfg.get("eos_token_ids")
    gen_eos = gen.get("eos_token_id")
    for src in (extra, gen_eos):
        for i in (src if isinstance(src, list) else [src]):
            if is_id(i) and i not in eos_ids:
                eos_ids.append(i)
    if bos is None and is_id(gen.get("bos_token_id")):
        bos = gen["bos_token_id"]
    pp_bos, pp_eos = _template_flags(tj, bos_tok, eos_tok)
    add_bos = cfg.get("add_bos_token")
    add_eos = cfg.get("add_eos_token")
    add_bos = bool(pp_bos) if add_bos is None else bool(add_bos)
    add_eos = bool(pp_eos) if add_eos is None else bool(add_eos)

    template = _chat_template(folder, cfg, opt_json)

    mml = cfg.get("model_max_length")
    mml = int(mml) if isinstance(mml, (int, float)) and 0 < mml < 1e12 else None
    unk = id_of(tok_of("unk_token"))
    if unk is None:
        unk = id_of((tj.get("model") or {}).get("unk_token"))
    return TokenizerSpec(
        tokenizer=tok, bos_id=bos, eos_ids=eos_ids, pad_id=id_of(tok_of("pad_token")), unk_id=unk,
        add_bos=add_bos and bos is not None, add_eos=add_eos and eos is not None,
        chat_template=template, model_max_length=mml)


def _check_template_processing(path: str, tj: dict) -> None:
    """The library loads a TemplateProcessing whose template names a special token that its
    ``special_tokens`` lacks, then panics on the first encode: refuse it here, by name."""
    for p in _template_processors(tj):
        known = p.get("special_tokens") if isinstance(p.get("special_tokens"), dict) else {}
        for part in ("single", "pair"):
            pieces = p.get(part) if isinstance(p.get(part), list) else []
            for piece in pieces:
                token = _special_of(piece)
                if token is not None and (not isinstance(token, str) or token not in known):
                    raise KilnError(path, f"post_processor's {part} template uses the special token "
                                          f"{reprlib.repr(token)}, which its special_tokens does not define")


def _library_failure(e: BaseException) -> bool:
    """An error of the tokenizers library: an Exception, or a Rust panic, which pyo3 raises as
    PanicException, a BaseException (KeyboardInterrupt and the like are not failures)."""
    return isinstance(e, Exception) or type(e).__name__ == "PanicException"


def _smoke_test(path: str | None, tok: Tokenizer) -> None:
    """Encode and decode a little text once: the library accepts some tokenizers that it then
    cannot run, and fails on them with a Rust panic."""
    try:
        ids = tok.encode("Hello world", "and a pair", add_special_tokens=True).ids
        tok.decode(ids, skip_special_tokens=False)
    except BaseException as e:
        if not _library_failure(e):
            raise
        raise KilnError(path, f"the tokenizers library loads it but cannot encode with it ({_first_line(e)})") from None


def _chat_template(folder: str, cfg: dict, opt_json) -> str | None:
    """The folder's chat template: chat_template.jinja, tokenizer_config.json, chat_template.json."""
    jinja = os.path.join(folder, "chat_template.jinja")
    source = jinja if os.path.isfile(jinja) else os.path.join(folder, "tokenizer_config.json")
    try:
        template = read_chat_template(folder, cfg)
        if template is None:
            source = os.path.join(folder, "chat_template.json")
            template = pick_template(opt_json("chat_template.json").get("chat_template"))
    except UnicodeDecodeError:
        raise KilnError(source, "not UTF-8 text") from None
    except OSError as e:
        raise KilnError(source, f"cannot read: {e.strerror or e}") from None
    except TypeError:      # a list of templates whose names are not strings (unhashable)
        raise KilnError(source, "chat_template is neither a string nor a list of named templates") from None
    if template is not None and not isinstance(template, str):
        raise KilnError(source, f"chat_template is a {type(template).__name__}, not a string")
    return template


# --------------------------------------------------------------------------------------------
# spec -> GGUF
# --------------------------------------------------------------------------------------------

def _contains(node, kind: str) -> bool:
    if not isinstance(node, dict):
        return False
    if node.get("type") == kind:
        return True
    return any(_contains(c, kind) for key in ("pretokenizers", "decoders", "normalizers", "processors")
               for c in node.get(key) or [])


def _space_prefix_from_json(tj: dict) -> bool:
    norm, pre = tj.get("normalizer"), tj.get("pre_tokenizer")
    def find(node, kind):
        if not isinstance(node, dict):
            return []
        if node.get("type") == kind:
            return [node]
        return [x for key in ("pretokenizers", "normalizers") for c in node.get(key) or [] for x in find(c, kind)]
    if any(p.get("prepend") == SPIECE_SPACE for p in find(norm, "Prepend")):
        return True
    for m in find(pre, "Metaspace"):
        if m.get("prepend_scheme", "always" if m.get("add_prefix_space", True) else "never") != "never":
            return True
    return any(b.get("add_prefix_space") for b in find(pre, "ByteLevel"))


def to_gguf_metadata(spec: TokenizerSpec) -> dict:
    """The ``tokenizer.ggml.*`` / ``tokenizer.chat_template`` keys llama.cpp expects.

    Values are plain Python: lists of str (tokens, merges), int (token_type; GGUF INT32),
    float (scores; GGUF FLOAT32), and int/bool/str scalars (ids are GGUF UINT32).
    """
    tj = json.loads(spec.tokenizer.to_str())
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise KilnError(None, f"cannot write a {model.get('type')} tokenizer to GGUF (only BPE models)")
    byte_level = _contains(tj.get("pre_tokenizer"), "ByteLevel") or _contains(tj.get("decoder"), "ByteLevel")
    kind = spec.gguf_model or ("gpt2" if byte_level else "llama" if (
        model.get("byte_fallback") or SPIECE_SPACE in json.dumps(tj.get("normalizer"))
        or _contains(tj.get("pre_tokenizer"), "Metaspace")) else None)
    if kind is None:
        raise KilnError(None, "tokenizer is neither byte-level BPE nor SentencePiece-style BPE; GGUF cannot hold it")

    vocab = dict(model.get("vocab") or {})
    added = {a["id"]: a for a in tj.get("added_tokens") or []}
    n = max(list(vocab.values()) + list(added)) + 1
    tokens = [None] * n
    for t, i in vocab.items():
        tokens[i] = t
    for i, a in added.items():
        tokens[i] = a["content"]
    holes = [i for i, t in enumerate(tokens) if t is None]
    for i in holes:
        tokens[i] = f"[PAD{i}]"

    types = spec.token_types if spec.token_types is not None and len(spec.token_types) == n else None
    if types is None:
        types = []
        unk_tok = model.get("unk_token")
        for i, t in enumerate(tokens):
            a = added.get(i)
            if i in holes:
                types.append(TOKEN_UNUSED)
            elif a is not None:
                types.append(TOKEN_CONTROL if a.get("special") else TOKEN_USER_DEFINED)
            elif t == unk_tok and kind == "llama":
                types.append(TOKEN_UNKNOWN)
            elif kind == "llama" and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                types.append(TOKEN_BYTE)
            else:
                types.append(TOKEN_NORMAL)
        if spec.unk_id is not None and kind == "llama" and types[spec.unk_id] == TOKEN_CONTROL:
            types[spec.unk_id] = TOKEN_UNKNOWN

    merges = [m if isinstance(m, str) else f"{m[0]} {m[1]}" for m in model.get("merges") or []]
    for m in model.get("merges") or []:
        if not isinstance(m, str) and " " in m[0][1:]:
            raise KilnError(None, f"merge {m[0]!r} + {m[1]!r} has a space inside; GGUF merges cannot hold it")
    out = {"tokenizer.ggml.model": kind}
    if kind == "gpt2":
        pre = spec.gguf_pre or _pre_name_from_json(tj.get("pre_tokenizer"))
        if pre is None:
            warnings.warn("tokenizer.json pre-tokenizer matches no llama.cpp pre type; writing 'default'",
                          stacklevel=2)
            pre = "default"
        out["tokenizer.ggml.pre"] = pre
    else:
        out["tokenizer.ggml.pre"] = spec.gguf_pre or "default"
    out["tokenizer.ggml.tokens"] = tokens
    out["tokenizer.ggml.token_type"] = [int(t) for t in types]
    if kind == "gpt2":
        out["tokenizer.ggml.merges"] = merges
    else:
        scores = spec.scores if spec.scores is not None and len(spec.scores) == n else None
        if scores is None:
            scores = [0.0] * n
            for rank, m in reversed(list(enumerate(merges))):
                a, b = _split_merge(m) or (m, "")
                j = vocab.get(a + b)
                if j is not None:
                    scores[j] = -float(rank + 1)   # earlier merge = higher score
        out["tokenizer.ggml.scores"] = [float(s) for s in scores]
    asp = spec.add_space_prefix
    if asp is None:
        asp = _space_prefix_from_json(tj)
    out["tokenizer.ggml.add_space_prefix"] = bool(asp)
    for key, val in (("bos_token_id", spec.bos_id), ("eos_token_id", spec.eos_id),
                     ("unknown_token_id", spec.unk_id), ("padding_token_id", spec.pad_id)):
        if val is not None:
            out[f"tokenizer.ggml.{key}"] = int(val)
    out["tokenizer.ggml.add_bos_token"] = bool(spec.add_bos)
    out["tokenizer.ggml.add_eos_token"] = bool(spec.add_eos)
    if spec.chat_template is not None:
        out["tokenizer.chat_template"] = spec.chat_template
    return out
