"""Tokenizers: GGUF metadata -> tokenizers, HF folders, GGUF round trip, runtime Tokenizer."""
from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.errors import KilnError
from kiln.frontends import tokenizer as ft
from conftest import SMOLLM2_REFERENCE, smollm2_path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = SMOLLM2_REFERENCE


def _load_runtime_module():
    """kiln.runtime.tokenizer, by file path if the runtime package is not importable yet."""
    try:
        from kiln.runtime import tokenizer as rt
        return rt
    except ImportError:
        spec = importlib.util.spec_from_file_location("_kiln_runtime_tokenizer", ROOT / "runtime" / "tokenizer.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod


rt = _load_runtime_module()


# ---------------------------------------------------------------------------------------------
# The real model (SmolLM2-135M-Instruct GGUF, 'gpt2' vocabulary with pre 'smollm')
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference():
    return json.loads(REFERENCE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def meta(smollm2_gguf):
    import gguf
    reader = gguf.GGUFReader(str(smollm2_gguf))
    return {k: f.contents() for k, f in reader.fields.items()
            if k.startswith("tokenizer.") or k in ("general.architecture", "llama.context_length")}


@pytest.fixture(scope="module")
def spec(meta):
    return ft.from_gguf_metadata(meta)


@pytest.fixture(scope="module")
def saved(spec, tmp_path_factory):
    folder = tmp_path_factory.mktemp("smollm2_tok")
    spec.save(folder)
    return folder


def test_reference_ids(spec, reference):
    assert spec.tokenizer.get_vocab_size() == 49152
    for case in reference["tokenizer"]:
        assert spec.tokenizer.encode(case["text"], add_special_tokens=False).ids == case["ids"], case["text"]


def test_special_ids_and_flags(spec):
    assert spec.bos_id == 1 and spec.eos_ids == [2] and spec.pad_id == 2 and spec.unk_id == 0
    assert spec.add_bos is False and spec.add_eos is False
    assert spec.model_max_length == 8192
    assert spec.tokenizer.token_to_id("<|im_start|>") == 1


def test_decode_round_trip(spec, reference):
    for case in reference["tokenizer"]:
        assert spec.tokenizer.decode(case["ids"], skip_special_tokens=False) == case["text"]


def test_runtime_save_load(spec, saved, reference):
    cfg = json.loads((saved / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["bos_token"] == "<|im_start|>" and cfg["eos_token"] == "<|im_end|>"
    assert cfg["pad_token"] == "<|im_end|>" and cfg["unk_token"] == "<|endoftext|>"
    assert cfg["add_bos_token"] is False and cfg["model_max_length"] == 8192
    assert cfg["chat_template"] == spec.chat_template

    tok = rt.Tokenizer.load(saved)
    assert tok.vocab_size == 49152 and tok.bos_id == 1 and tok.eos_ids == [2]
    for case in reference["tokenizer"]:
        ids = tok.encode(case["text"])
        assert ids == case["ids"], case["text"]
        assert tok.encode(case["text"], add_special_tokens=True) == case["ids"]  # add_bos is False
        assert tok.decode(ids, skip_special_tokens=False) == case["text"]
    chat = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(tok.encode(chat)) == "user\nWhat is 2+2?\nassistant\n"  # specials skipped


def test_chat_template_example(saved, reference):
    tok = rt.Tokenizer.load(saved)
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    assert text == reference["chat_template_example"]
    no_prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=False)
    assert not no_prompt.endswith("<|im_start|>assistant\n")
    assert any(g["prompt"] == text for g in reference["generations"])
    for g in reference["generations"]:
        assert tok.encode(g["prompt"]) == g["prompt_ids"]
        assert tok.decode(g["greedy_ids"]) == g["greedy_text"]


def test_stream_decoding_real(saved, reference):
    tok = rt.Tokenizer.load(saved)
    for case in reference["tokenizer"]:
        dec = tok.stream_decoder(skip_special_tokens=False)
        chunks = [dec.put(i) for i in case["ids"]]
        assert all("\ufffd" not in c for c in chunks), (case["text"], chunks)
        assert "".join(chunks) + dec.flush() == case["text"]
    # an emoji is split over several byte-level tokens: nothing is emitted until it is whole
    emoji = next(c for c in reference["tokenizer"] if "🙂" in c["text"])
    dec = tok.stream_decoder()
    chunks = [dec(i) for i in emoji["ids"]]
    assert chunks[:3] == ["em", "oji", " 🙂"] and chunks[3:5] == ["", ""] and chunks[5] == "👍"
    assert "".join(chunks) == "emoji 🙂👍🏽 done"


def test_gguf_round_trip(meta, spec, reference):
    out = ft.to_gguf_metadata(spec)
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
                "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
                "tokenizer.ggml.add_space_prefix", "tokenizer.chat_template"):
        want = meta[key]
        assert (list(out[key]) == list(want)) if isinstance(want, list) else out[key] == want, key
    again = ft.from_gguf_metadata(out)
    for case in reference["tokenizer"]:
        assert again.tokenizer.encode(case["text"], add_special_tokens=False).ids == case["ids"]


def test_gguf_hf_gguf_round_trip(meta, saved, reference):
    """GGUF -> HF folder -> GGUF: only what tokenizer.json/tokenizer_config.json hold survives."""
    hf = ft.from_hf_folder(saved)
    assert hf.bos_id == 1 and hf.eos_ids == [2] and hf.pad_id == 2 and hf.unk_id == 0
    out = ft.to_gguf_metadata(hf)
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
                "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id", "tokenizer.chat_template"):
        want = meta[key]
        assert (list(out[key]) == list(want)) if isinstance(want, list) else out[key] == want, key
    again = ft.from_gguf_metadata(out)
    for case in reference["tokenizer"]:
        assert again.tokenizer.encode(case["text"], add_special_tokens=False).ids == case["ids"]


# ---------------------------------------------------------------------------------------------
# A synthetic SentencePiece ('llama') vocabulary
# ---------------------------------------------------------------------------------------------

SP = "\u2581"
# normal pieces, best first: a SentencePiece BPE model scores a piece by when it was merged
_PIECES = ["ll", "he", SP + "w", "or", "ld", "llo", "hello", SP + "hello", SP + "wor", SP + "world",
           "lo", SP + "h", "el"]
_CHARS = [SP, "h", "e", "l", "o", "w", "r", "d", "!", "a"]


def _sp_meta(add_space_prefix=True):
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [ft.TOKEN_UNKNOWN, ft.TOKEN_CONTROL, ft.TOKEN_CONTROL] + [ft.TOKEN_BYTE] * 256
    scores = [0.0] * len(tokens)
    for k, p in enumerate(_PIECES):
        tokens.append(p), types.append(ft.TOKEN_NORMAL), scores.append(-float(k))
    for c in _CHARS:
        tokens.append(c), types.append(ft.TOKEN_NORMAL), scores.append(-1000.0)
    tokens += ["<tool>", "<|im_end|>"]
    types += [ft.TOKEN_USER_DEFINED, ft.TOKEN_CONTROL]
    scores += [0.0, 0.0]
    return {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_space_prefix": add_space_prefix,
        "tokenizer.chat_template": "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}",
    }


def _spm_oracle(text, meta):
    """llama.cpp's SentencePiece algorithm, plainly: merge the best-scored adjacent pair, the
    leftmost on ties, until nothing merges; unknown characters become <0xXX> byte tokens."""
    tokens, scores, types = (meta[k] for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores",
                                               "tokenizer.ggml.token_type"))
    vocab = {t: i for i, t in enumerate(tokens)}
    if not text:
        return []
    syms = list((SP if meta["tokenizer.ggml.add_space_prefix"] else "") + text.replace(" ", SP))
    while True:
        best = None
        for i in range(len(syms) - 1):
            j = vocab.get(syms[i] + syms[i + 1])
            if j is not None and types[j] == ft.TOKEN_NORMAL and (best is None or scores[j] > scores[best[1]]):
                best = (i, j)
        if best is None:
            break
        i = best[0]
        syms[i:i + 2] = [syms[i] + syms[i + 1]]
    out = []
    for s in syms:
        out.extend([vocab[s]] if s in vocab else [vocab[f"<0x{b:02X}>"] for b in s.encode()])
    return out


SP_TEXTS = ["hello world", "hello  world!", "world hello", " hello", "hellohello", "héllo wörld 🙂",
            "held low", "", "a"]


@pytest.mark.parametrize("prefix", [True, False])
def test_sentencepiece_vocab(prefix):
    m = _sp_meta(prefix)
    s = ft.from_gguf_metadata(m)
    assert s.add_bos is True and s.bos_id == 1 and s.eos_ids == [2] and s.unk_id == 0
    tokens = m["tokenizer.ggml.tokens"]
    for text in SP_TEXTS:
        ids = s.tokenizer.encode(text, add_special_tokens=False).ids
        assert ids == _spm_oracle(text, m), (text, [tokens[i] for i in ids])
        assert s.tokenizer.decode(ids) == text
    hello = s.tokenizer.encode("hello world", add_special_tokens=False).ids
    assert [tokens[i] for i in hello] == [SP + "hello" if prefix else "hello", SP + "world"]
    # byte fallback: 'é' is not in the vocabulary
    ids = s.tokenizer.encode("é", add_special_tokens=False).ids
    assert [tokens[i] for i in ids][-2:] == ["<0xC3>", "<0xA9>"]
    # control and user-defined tokens are matched whole; like llama.cpp, the space prefix is
    # added again after a special token
    ids = s.tokenizer.encode("<s>hello<tool>world<|im_end|>", add_special_tokens=False).ids
    p = SP if prefix else ""
    assert [tokens[i] for i in ids] == (["<s>", p + "hello", "<tool>"] + ([p + "world"] if prefix else ["w", "or", "ld"])
                                        + ["<|im_end|>"])
    assert s.tokenizer.decode(ids) == ("hello<tool> world" if prefix else "hello<tool>world")


def test_sentencepiece_runtime_and_round_trips(tmp_path):
    m = _sp_meta()
    s = ft.from_gguf_metadata(m)
    # GGUF -> spec -> GGUF is exact (scores and types kept)
    out = ft.to_gguf_metadata(s)
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.scores",
                "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.add_space_prefix", "tokenizer.chat_template"):
        assert out[key] == m[key], key
    assert out["tokenizer.ggml.add_bos_token"] is True
    # through an HF folder: tokens and types survive, scores are rebuilt from the merge order
    s.save(tmp_path)
    hf = ft.from_hf_folder(tmp_path)
    out2 = ft.to_gguf_metadata(hf)
    assert out2["tokenizer.ggml.model"] == "llama"
    assert out2["tokenizer.ggml.tokens"] == m["tokenizer.ggml.tokens"]
    assert out2["tokenizer.ggml.token_type"] == m["tokenizer.ggml.token_type"]
    assert out2["tokenizer.ggml.add_space_prefix"] is True and out2["tokenizer.ggml.add_bos_token"] is True
    again = ft.from_gguf_metadata(out2)
    for text in SP_TEXTS:
        want = s.tokenizer.encode(text, add_special_tokens=False).ids
        assert again.tokenizer.encode(text, add_special_tokens=False).ids == want
        assert hf.tokenizer.encode(text, add_special_tokens=False).ids == want
    assert json.loads(again.tokenizer.to_str())["model"]["merges"] == json.loads(s.tokenizer.to_str())["model"]["merges"]

    tok = rt.Tokenizer.load(tmp_path)
    ids = tok.encode("hello world")
    assert tok.encode("hello world", add_special_tokens=True) == [1] + ids
    assert tok.decode([1] + ids + [2]) == "hello world"
    assert tok.decode([1] + ids, skip_special_tokens=False) == "<s> hello world"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "[user] hi\n"
    # stream decoding keeps spaces between words and holds split bytes back
    text = "hello héllo world 🙂!"
    ids = tok.encode(text)
    dec = tok.stream_decoder()
    chunks = [dec.put(i) for i in ids]
    assert all("\ufffd" not in c for c in chunks)
    assert "".join(chunks) + dec.flush() == text == tok.decode(ids)


# ---------------------------------------------------------------------------------------------
# Pre-tokenizers, errors, HF folders
# ---------------------------------------------------------------------------------------------

def _tiny_gpt2_meta(pre):
    bl = {b: c for b, c in zip(range(256), _byte_chars())}
    tokens = ["<|endoftext|>"] + [bl[b] for b in range(256)] + ["he", "ll", "hell", "hello", "Ġw", "Ġworld",
                                                                   "12", "123"]
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "1 2", "12 3"]
    tokens += ["or", "ld", "Ġwor"]
    merges += ["o r", "l d", "Ġw or", "Ġwor ld"]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [ft.TOKEN_CONTROL] + [ft.TOKEN_NORMAL] * (len(tokens) - 1),
            "tokenizer.ggml.merges": merges, "tokenizer.ggml.eos_token_id": 0, "tokenizer.ggml.bos_token_id": 0}


def _byte_chars():
    """The GPT-2 byte-to-unicode table, for building a tiny byte-level vocabulary."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


@pytest.mark.parametrize("pre,digits", [("gpt-2", ["123"]), ("smollm", ["1", "2", "3"]),
                                        ("llama-bpe", ["123"]), ("qwen2", ["1", "2", "3"]),
                                        ("deepseek-llm", ["123"]), ("default", ["123"]), ("gpt-4o", ["123"])])
def test_pre_tokenizers(pre, digits):
    s = ft.from_gguf_metadata(_tiny_gpt2_meta(pre))
    enc = s.tokenizer.encode("hello world 123", add_special_tokens=False)
    assert enc.tokens[:2] == ["hello", "Ġworld"]
    assert [t for t in enc.tokens[2:] if t != "Ġ"] == digits
    assert s.tokenizer.decode(enc.ids) == "hello world 123"
    assert ft.to_gguf_metadata(s)["tokenizer.ggml.pre"] == pre
    assert s.add_bos is (pre == "llama-bpe")  # llama.cpp's defaults when add_bos_token is absent


def test_pre_recognised_from_tokenizer_json():
    for pre in ("gpt-2", "smollm", "llama-bpe", "qwen2", "deepseek-llm", "deepseek-coder", "gpt-4o"):
        s = ft.from_gguf_metadata(_tiny_gpt2_meta(pre))
        s.gguf_pre = None
        assert ft.to_gguf_metadata(s)["tokenizer.ggml.pre"] == pre
    # Hugging Face's own spellings: ByteLevel's built-in regex, and Digits + ByteLevel
    assert ft._pre_name_from_json({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}) == "gpt-2"
    assert ft._pre_name_from_json({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "use_regex": True}]}) == "smollm"
    hf_llama3 = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                 "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
    assert ft._pre_name_from_json({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": hf_llama3}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "use_regex": False}]}) == "llama-bpe"


def test_gpt_4o_pre_tokenizer_splits_as_o200k():
    """gpt-oss's (o200k) pre-tokenizer, GGUF name gpt-4o: a capital run then lower-case letters
    make one word ("HelloWorld" is two), a contraction stays on its word, digits go in threes;
    and the regex as the model's tokenizer.json spells it is recognised as gpt-4o."""
    s = ft.from_gguf_metadata(_tiny_gpt2_meta("gpt-4o"))
    words = [w for w, _ in s.tokenizer.pre_tokenizer.pre_tokenize_str("HelloWorld it's OK 12345 a/b\n")]
    assert words == ["Hello", "World", "Ġit's", "ĠOK", "Ġ", "123", "45", "Ġa", "/b", "Ċ"]
    contractions = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    upper, lower = "[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]", "[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]"
    o200k = (f"[^\\r\\n\\p{{L}}\\p{{N}}]?{upper}*{lower}+{contractions}?|[^\\r\\n\\p{{L}}\\p{{N}}]?{upper}+{lower}*"
             f"{contractions}?|\\p{{N}}{{1,3}}| ?[^\\s\\p{{L}}\\p{{N}}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
    assert ft._pre_name_from_json({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": o200k}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "use_regex": False}]}) == "gpt-4o"


def test_special_token_text_with_colon_and_space():
    m = _tiny_gpt2_meta("llama-bpe")
    m["tokenizer.ggml.tokens"] = ["<|x:bos y|>"] + m["tokenizer.ggml.tokens"][1:]
    s = ft.from_gguf_metadata(m)
    assert s.add_bos
    assert s.tokenizer.encode("hello", add_special_tokens=True).ids[0] == 0
    assert s.tokenizer.encode("<|x:bos y|>hello", add_special_tokens=False).ids[0] == 0


def test_unknown_pre_warns():
    with pytest.warns(UserWarning, match="unknown GGUF pre-tokenizer"):
        s = ft.from_gguf_metadata(_tiny_gpt2_meta("no-such-pre"))
    assert s.tokenizer.decode(s.tokenizer.encode("hello world").ids) == "hello world"


def _bad(meta, **changes):
    m = dict(meta)
    for k, v in changes.items():
        key = "tokenizer.ggml." + k
        if v is None:
            m.pop(key, None)
        else:
            m[key] = v
    return m


@pytest.mark.parametrize("changes,msg", [
    ({"model": None}, "no tokenizer.ggml.model"),
    ({"model": "t5"}, "not supported"),
    ({"tokens": None}, "no tokenizer.ggml.tokens"),
    ({"tokens": []}, "empty"),
    ({"tokens": "abc"}, "should be an array"),
    ({"token_type": [1, 1]}, "token_type has 2 entries"),
    ({"merges": None}, "no tokenizer.ggml.merges"),
    ({"merges": ["hello"]}, "not two tokens"),
])
def test_malformed_gguf_metadata(changes, msg):
    with pytest.raises(KilnError, match=msg) as e:
        ft.from_gguf_metadata(_bad(_tiny_gpt2_meta("gpt-2"), **changes))
    assert "\n" not in str(e.value)


def test_malformed_sentencepiece_metadata():
    m = _sp_meta()
    with pytest.raises(KilnError, match="scores has 3 entries"):
        ft.from_gguf_metadata(_bad(m, scores=[0.0, 0.0, 0.0]))
    toks = list(m["tokenizer.ggml.tokens"])
    toks[-1] = toks[-2]
    with pytest.raises(KilnError, match="twice"):
        ft.from_gguf_metadata(_bad(m, tokens=toks))
    with pytest.raises(KilnError, match="neither"):
        ft.from_gguf_metadata(_bad(m, scores=None))


def test_out_of_range_special_id_warns():
    m = _tiny_gpt2_meta("gpt-2")
    m["tokenizer.ggml.padding_token_id"] = 10 ** 6
    with pytest.warns(UserWarning, match="outside the vocabulary"):
        s = ft.from_gguf_metadata(m)
    assert s.pad_id is None


def test_hf_folder_edge_cases(tmp_path):
    assert ft.from_hf_folder(tmp_path) is None
    (tmp_path / "tokenizer.json").write_text("{ not json", encoding="utf-8")
    with pytest.raises(KilnError, match="not valid JSON") as e:
        ft.from_hf_folder(tmp_path)
    assert e.value.path == str(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "Nope"}}', encoding="utf-8")
    with pytest.raises(KilnError, match="tokenizers library"):
        ft.from_hf_folder(tmp_path)


def test_several_eos_ids_survive_save(tmp_path):
    m = _sp_meta()
    im_end = m["tokenizer.ggml.tokens"].index("<|im_end|>")
    s = ft.from_gguf_metadata(dict(m, **{"tokenizer.ggml.eot_token_id": im_end}))
    assert s.eos_ids == [2, im_end]  # eos, then eot
    s.save(tmp_path)
    assert rt.Tokenizer.load(tmp_path).eos_ids == s.eos_ids
    assert ft.from_hf_folder(tmp_path).eos_ids == s.eos_ids


def test_hf_folder_reads_hf_conventions(tmp_path):
    """A folder as transformers writes it: a TemplateProcessing post-processor instead of
    add_bos_token, eos ids in generation_config.json, the template in chat_template.jinja."""
    s = ft.from_gguf_metadata(_tiny_gpt2_meta("llama-bpe"))  # add_bos by default -> post-processor
    s.tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<|endoftext|>", "__type": "AddedToken"}, "eos_token": "<|endoftext|>",
        "model_max_length": int(1e30)}), encoding="utf-8")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 5]}), encoding="utf-8")
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}{{ messages[0]['content'] }}", encoding="utf-8")
    hf = ft.from_hf_folder(tmp_path)
    assert hf.add_bos is True and hf.bos_id == 0 and hf.eos_ids == [0, 5] and hf.model_max_length is None
    assert hf.chat_template.startswith("{{ bos_token }}")
    tok = rt.Tokenizer.load(tmp_path)
    assert tok.add_bos is True and tok.eos_ids == [0, 5]
    assert tok.encode("hello", add_special_tokens=True) == [0] + tok.encode("hello")
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "<|endoftext|>x"


# ---------------------------------------------------------------------------------------------
# Runtime: chat template machinery, import boundary
# ---------------------------------------------------------------------------------------------

@pytest.fixture()
def small_tok(tmp_path):
    ft.from_gguf_metadata(_sp_meta()).save(tmp_path)
    return rt.Tokenizer.load(tmp_path)


def test_chat_template_features(small_tok):
    msgs = [{"role": "user", "content": "héllo"}]
    t = ("{% for m in messages %}{{ m | tojson }}{% if loop.last %}{% break %}{% endif %}{% endfor %}"
         "{% generation %}[{{ bos_token }}|{{ eos_token }}|{{ extra }}]{% endgeneration %}"
         "{{ strftime_now('%Y') | length }}")
    out = small_tok.apply_chat_template(msgs, chat_template=t, extra="x")
    assert out == '{"role": "user", "content": "héllo"}[<s>|</s>|x]4'
    # trim_blocks / lstrip_blocks as in transformers
    t2 = "  {% if true %}\nA\n  {% endif %}\nB"
    assert small_tok.apply_chat_template([], chat_template=t2) == "A\nB"
    with pytest.raises(rt.ChatTemplateError, match="roles must alternate"):
        small_tok.apply_chat_template(msgs, chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(rt.ChatTemplateError, match="does not compile"):
        small_tok.apply_chat_template(msgs, chat_template="{% if %}")
    with pytest.raises(rt.ChatTemplateError):  # the sandbox refuses to mutate the input
        small_tok.apply_chat_template(msgs, chat_template="{{ messages.append(1) }}")
    small_tok.chat_template = None
    with pytest.raises(rt.ChatTemplateError, match="no chat template"):
        small_tok.apply_chat_template(msgs)


def test_runtime_does_not_import_frontends():
    src = (ROOT / "runtime" / "tokenizer.py").read_text(encoding="utf-8")
    imported = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
    allowed = {"tokenizers", "jinja2"} | set(sys.stdlib_module_names)
    assert imported <= allowed, imported - allowed
    code = ("import sys, importlib.util as u\n"
            f"s = u.spec_from_file_location('rt', {str(ROOT / 'runtime' / 'tokenizer.py')!r})\n"
            "m = u.module_from_spec(s); s.loader.exec_module(m)\n"
            "bad = [n for n in sys.modules if n.startswith(('kiln.frontends', 'onnx', 'tvm', 'gguf'))]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)
