"""GGUF ``tokenizer.ggml.pre`` names and the regexes they stand for, applied one after another
before byte-level BPE (as llama.cpp's llama-vocab.cpp does), and the way back: which name a
tokenizer.json's pre-tokenizer sequence is."""
from __future__ import annotations

import warnings
from dataclasses import dataclass


_CONTRACTIONS_CI = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (_CONTRACTIONS_CI + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (_CONTRACTIONS_CI + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEEPSEEK_LETTERS = (  # written as escapes: NFC would fold some of these characters
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
    "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3"
    "-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd"
    "\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-"
    "\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4"
    "\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2"
    "-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a"
    "-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e"
    "-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b"
    "-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f"
    "\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0"
    "-\U000118df\U0001e900-\U0001e943"
)
_CJK = "[一-龥ࠀ-一가-퟿]+"
# o200k (gpt-4o, gpt-oss): a word is an optional leading non-letter, then upper-case-ish letters
# and lower-case-ish ones (so "HelloWorld" splits in two), then a contraction
_UPPERISH, _LOWERISH = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_GPT4O = (r"[^\r\n\p{L}\p{N}]?" + _UPPERISH + "*" + _LOWERISH + "+" + _CONTRACTIONS_CI + "?"
          + r"|[^\r\n\p{L}\p{N}]?" + _UPPERISH + "+" + _LOWERISH + "*" + _CONTRACTIONS_CI + "?"
          + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class _Pre:
    name: str                 # the name kiln writes into GGUF
    regexes: tuple            # applied in order
    aliases: tuple = ()       # other GGUF names with the same regexes
    ignore_merges: bool = False
    add_bos: bool = False     # llama.cpp's default when tokenizer.ggml.add_bos_token is absent


PRE_TOKENIZERS: dict[str, _Pre] = {}
for _p in (
    _Pre("default", (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]")),
    _Pre("llama-bpe", (_LLAMA3,), ("llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral",
                                   "midm-2.0", "lfm2", "dbrx", "smaug-bpe"),
         ignore_merges=True, add_bos=True),
    _Pre("gpt-2", (_GPT2,), ("gpt2", "phi-2", "mpt", "olmo", "jais", "jina-es", "jina-de",
                             "gigachat", "jina-v2-es", "jina-v2-de", "exaone4", "mellum",
                             "trillion", "granite-docling", "roberta-bpe")),
    _Pre("smollm", (r"\p{N}", _GPT2), ("starcoder", "refact", "command-r", "codeshell", "exaone",
                                      "minerva-7b")),
    _Pre("qwen2", (_QWEN2,), ("qwen2.5", "deepseek-r1-qwen", "stablelm2", "megrez", "hunyuan",
                              "kormo")),
    _Pre("deepseek-llm", (r"[\r\n]", r"\s?[" + _DEEPSEEK_LETTERS + "]+",
                          r"\s?[!-/:-~！-／：-～‘-‟　-。]+", r"\s+$", _CJK, r"\p{N}+")),
    _Pre("deepseek-coder", (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}")),
    _Pre("falcon", (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, "[0-9][0-9][0-9]")),
    _Pre("chatglm-bpe", (_LLAMA3,), ("glm4",)),
    _Pre("gpt-4o", (_GPT4O,), ("llama4", "kanana2", "talkie")),
):
    for _n in (_p.name,) + _p.aliases:
        PRE_TOKENIZERS[_n] = _p


def _pre_info(name: str | None) -> _Pre:
    if name in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[name]
    warnings.warn(f"unknown GGUF pre-tokenizer {name!r}; using llama.cpp's 'default' regexes, "
                  "so tokenization may differ from the original model", stacklevel=4)
    return PRE_TOKENIZERS["default"]


def _normalize_regex(rx: str) -> str:
    """Spell a regex the way the table above does, so HF and llama.cpp forms compare equal."""
    rx = rx.replace("(?i:'s|'t|'re|'ve|'m|'ll|'d)", _CONTRACTIONS_CI)
    if rx.endswith(r"|\s+(?!\S)|\s+") and not rx.startswith(_CONTRACTIONS_CI):
        rx = rx[: -len(r"|\s+")]       # gpt-2's trailing '|\s+' changes nothing: gaps are kept
    return rx


def _pre_name_from_json(pre: dict | None) -> str | None:
    """Recognise a tokenizer.json pre_tokenizer as one of the GGUF pre types (None if unknown)."""
    steps = [] if pre is None else (pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre])
    regexes = []
    for st in steps:
        kind = st.get("type")
        if kind == "Split":
            if st.get("behavior") != "Isolated" or st.get("invert"):
                return None
            pat = st.get("pattern", {})
            if "Regex" in pat:
                regexes.append(pat["Regex"])
            else:
                regexes.append(_escape_literal(pat.get("String", "")))
        elif kind == "ByteLevel":
            if st.get("use_regex", True):
                regexes.append(_GPT2)
        elif kind == "Digits":
            regexes.append(r"\p{N}" if st.get("individual_digits") else r"\p{N}+")
        else:
            return None
    sig = tuple(_normalize_regex(r) for r in regexes)
    for p in PRE_TOKENIZERS.values():
        if tuple(_normalize_regex(r) for r in p.regexes) == sig:
            return p.name
    return None


def _escape_literal(s: str) -> str:
    return "".join("\\" + c if c in r"\.^$|?*+()[]{}" else c for c in s)
