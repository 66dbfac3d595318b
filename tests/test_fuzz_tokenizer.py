"""Structure-aware fuzzing of the tokenizer readers: GGUF tokenizer metadata and HF folders.

GGUF side: the ``tokenizer.ggml.*`` values of a byte-level BPE and a SentencePiece vocabulary
are edited as GGUF can hold them: keys dropped, values retyped (numbers, strings, bools, arrays,
nested arrays), token lists with repeats, empty or non-UTF-8 tokens (kept as surrogates by the
GGUF reader), merges that are not pairs, scores and types out of range, special ids past the
vocabulary. HF side: a folder written by ``TokenizerSpec.save`` plus special_tokens_map.json,
generation_config.json and a chat template, each JSON file edited knowing its keys, cut,
made invalid UTF-8, deleted or replaced by a folder. Every case must build a tokenizer that
then encodes and decodes, or fail with a one-line KilnError naming the file.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
from hypothesis import strategies as st

import fuzzing
from kiln.errors import KilnError
from kiln.frontends import tokenizer as ft

# ==========================================================================================
# valid vocabularies
# ==========================================================================================


def gpt2_meta() -> dict:
    from test_fuzz_gguf import gpt2_vocab_metadata
    return {k: getattr(v, "value", v) for k, v in gpt2_vocab_metadata(256).items()}


def spm_meta() -> dict:
    pieces = ["▁", "▁t", "h", "e", "he", "▁the", "t", "a", "▁a", "c", "▁c", "at", "▁cat", "▁hat", "in", "▁in"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces + ["<|user|>"]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces) + [4]
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(pieces))] + [0.0]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
            "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_space_prefix": True,
            "tokenizer.chat_template": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
            "general.architecture": "llama", "llama.context_length": 128}


TEXT = "the cat in a hat é 漢字 \n\t <|im_start|> <s> 123"


def touch(spec: ft.TokenizerSpec, save_to: Path | None = None) -> int:
    """Use what was read: encode and decode, and write it out as a conversion would."""
    ids = spec.tokenizer.encode(TEXT, add_special_tokens=True).ids
    spec.tokenizer.decode(ids)
    spec.tokenizer_config()
    if save_to is not None:
        spec.save(save_to)
        ft.to_gguf_metadata(spec)
    return len(ids)


def _quiet(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # unknown pre-tokenizer, ids outside the vocabulary
        return fn()


# ==========================================================================================
# GGUF metadata
# ==========================================================================================

KEYS = ["tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
        "tokenizer.ggml.scores", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id", "tokenizer.ggml.add_bos_token",
        "tokenizer.ggml.add_eos_token", "tokenizer.ggml.add_space_prefix", "tokenizer.chat_template",
        "general.architecture", "llama.context_length"]


def gguf_scalars():
    """Single values a GGUF file can hold (strings may carry surrogates: bytes that were not UTF-8)."""
    return st.one_of(
        st.sampled_from([0, 1, 2, 3, 255, 256, 299, 300, 301, 2**31 - 1, 2**32 - 1, 2**63 - 1, 2**64 - 1,
                         -1, -2**31, -2**63]),
        st.sampled_from([0.0, -0.0, 0.5, -1.5, 1e30, math.inf, -math.inf, math.nan]),
        st.booleans(),
        st.sampled_from(["", "gpt2", "llama", "bert", "t5", "no_vocab", "default", "llama-bpe", "qwen2", "smollm",
                         "unknown-pre", "gpt2\udcff", "\udcff", "x" * 5000, "a b", " ", "{{ raise_exception('x') }}",
                         "{% for %}", "{{ 1 / 0 }}"]),
        st.text(max_size=6),
    )


def gguf_values():
    return st.one_of(gguf_scalars(), st.lists(gguf_scalars(), max_size=4),
                     st.lists(st.lists(st.integers(0, 5), max_size=3), max_size=3))


def _list_edit(values: list, key: str, draw) -> tuple[list, str]:
    values = list(values)
    if not values:
        return [draw(gguf_scalars())], f"{key}: one item"
    i = draw(st.integers(0, len(values) - 1))
    op = draw(st.sampled_from(["set", "repeat", "drop", "truncate", "append", "empty_token", "bad_utf8",
                               "space_merge"]))
    if op == "set":
        values[i] = draw(gguf_scalars())
    elif op == "repeat":
        values[i] = values[draw(st.integers(0, len(values) - 1))]
    elif op == "drop":
        del values[i]
    elif op == "truncate":
        values = values[:i]
    elif op == "append":
        values.append(draw(gguf_scalars()))
    elif op == "empty_token":
        values[i] = ""
    elif op == "bad_utf8":
        values[i] = str(values[i]) + "\udcc3"
    else:
        values[i] = draw(st.sampled_from([" ", "  ", "a", "a  b", " a", "a ", "Ġ t x", "h\x00 e"]))
    return values, f"{key}[{i}] {op}"


def mutated_meta(meta: dict, draw) -> tuple[dict, str]:
    meta = dict(meta)
    notes = []
    for _ in range(draw(st.sampled_from([1, 1, 2, 3]))):
        key = draw(st.sampled_from(KEYS))
        op = draw(st.sampled_from(["list", "list", "set", "delete"]))
        if op == "list" and isinstance(meta.get(key), list):
            meta[key], note = _list_edit(meta[key], key, draw)
        elif op == "delete":
            meta.pop(key, None)
            note = f"delete {key}"
        else:
            meta[key] = draw(gguf_values())
            note = f"{key} = {meta[key]!r}"[:120]
        notes.append(note)
    return meta, " | ".join(notes)


_METAS: dict[str, dict] = {}


def prepare(work: Path) -> None:
    if not _METAS:
        _METAS["gpt2"] = gpt2_meta()
        _METAS["spm"] = spm_meta()


@fuzzing.target(data=st.data())
def fuzz_gguf_metadata(ws, data):
    prepare(ws.root)
    name = data.draw(st.sampled_from(sorted(_METAS)), label="base")
    meta, note = mutated_meta(_METAS[name], data.draw)
    ws.note(f"{name} | {note}")
    path = ws.path("model.gguf")           # the file the metadata stands for; it is only named
    fuzzing.expect(ws, lambda: _quiet(lambda: touch(ft.from_gguf_metadata(meta, path), ws.path("out"))), path)


# ==========================================================================================
# HF folders
# ==========================================================================================

_FOLDERS: dict[str, dict[str, bytes]] = {}
FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
         "chat_template.json", "chat_template.jinja"]
FOCUS = {"tokenizer.json": [("model",), ("added_tokens",), ("post_processor",), ("pre_tokenizer",),
                            ("normalizer",), ("decoder",)],
         "tokenizer_config.json": [("bos_token",), ("eos_token",), ("chat_template",), ("add_bos_token",),
                                   ("model_max_length",), ("eos_token_ids",), ("unk_token",), ("pad_token",)],
         "special_tokens_map.json": [("bos_token",), ("eos_token",)],
         "generation_config.json": [("eos_token_id",), ("bos_token_id",)],
         "chat_template.json": [("chat_template",)]}


def _hf_folder_files(work: Path) -> None:
    for name, meta in (("gpt2", gpt2_meta()), ("spm", spm_meta())):
        folder = work / name
        _quiet(lambda: ft.from_gguf_metadata(meta)).save(folder)
        files = {p.name: p.read_bytes() for p in folder.iterdir()}
        files["special_tokens_map.json"] = json.dumps({"bos_token": {"content": "<s>", "lstrip": False},
                                                       "eos_token": "</s>", "pad_token": "<unk>"}).encode()
        files["generation_config.json"] = json.dumps({"bos_token_id": 1, "eos_token_id": [2, 255]}).encode()
        if name == "gpt2":
            files["chat_template.jinja"] = b"{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}"
        else:
            files["chat_template.json"] = json.dumps({"chat_template": [
                {"name": "default", "template": "{{ messages[0]['content'] }}"}, {"name": "tool", "template": "x"}]}).encode()
        _FOLDERS[name] = files


def mutated_folder(folder: Path, files: dict[str, bytes], draw) -> str:
    files = dict(files)
    notes, kinds = [], {}
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3]))):
        name = draw(st.sampled_from(FILES))
        op = draw(st.sampled_from(["json", "json", "json", "text", "delete", "folder"]))
        kinds.pop(name, None)
        if op == "delete":
            files.pop(name, None)
        elif op == "folder":
            files.pop(name, None)
            kinds[name] = "folder"
        elif name == "chat_template.jinja":
            files[name], note = fuzzing.edit_bytes(files.get(name, b"{{ x }}"), draw)
            op = note
        elif op == "text" and name in files:
            files[name], op = fuzzing.mutate_json_text(files[name].decode("utf-8", "surrogateescape"), draw)
        else:
            try:
                doc = json.loads(files.get(name, b"{}"))
            except (ValueError, RecursionError):     # broken by an earlier edit of this case
                doc = {}
            files[name], op = fuzzing.json_case(doc, draw, focus=FOCUS.get(name, ()), max_edits=2)
        notes.append(f"{name}: {op}")
    for name, blob in files.items():
        (folder / name).write_bytes(blob)
    for name in kinds:
        (folder / name).mkdir()
    return " | ".join(notes)


def prepare_folders(work: Path) -> None:
    if not _FOLDERS:
        work.mkdir(parents=True, exist_ok=True)
        _hf_folder_files(work)


@fuzzing.target(data=st.data())
def fuzz_hf_folder(ws, data):
    prepare_folders(ws.root / "bases")
    name = data.draw(st.sampled_from(sorted(_FOLDERS)), label="base")
    folder = ws.path("tok")
    folder.mkdir()
    ws.note(f"{name} | " + mutated_folder(folder, _FOLDERS[name], data.draw))

    def read():
        spec = _quiet(lambda: ft.from_hf_folder(folder))
        return None if spec is None else touch(spec, ws.path("out"))
    fuzzing.expect(ws, read, folder)


# ==========================================================================================
# the tests
# ==========================================================================================

def test_bases_read(tmp_path):
    prepare(tmp_path)
    for meta in _METAS.values():
        assert touch(_quiet(lambda: ft.from_gguf_metadata(meta, tmp_path / "m.gguf"))) > 3
    prepare_folders(tmp_path / "bases")
    for name, files in _FOLDERS.items():
        folder = tmp_path / name
        folder.mkdir()
        for f, blob in files.items():
            (folder / f).write_bytes(blob)
        spec = ft.from_hf_folder(folder)
        assert touch(spec) > 3 and spec.chat_template


def test_regression_gguf_text_that_is_not_utf8(tmp_path):
    # found by fuzz_gguf_metadata: a chat template holding bytes that are not UTF-8 (surrogates
    # from the GGUF reader) was read, then TokenizerSpec.save raised UnicodeEncodeError
    for key, value in [("tokenizer.chat_template", "{{ x }}\udcff"), ("tokenizer.ggml.pre", "gpt2\udcff")]:
        meta = dict(gpt2_meta(), **{key: value})
        with pytest.raises(KilnError, match=f"{key} is not valid UTF-8") as e:
            ft.from_gguf_metadata(meta, tmp_path / "m.gguf")
        fuzzing.check_error(e.value, [tmp_path / "m.gguf"])
    meta = gpt2_meta()
    meta["tokenizer.ggml.tokens"] = list(meta["tokenizer.ggml.tokens"])
    meta["tokenizer.ggml.tokens"][7] = "a\udcc3"
    with pytest.raises(KilnError, match=r"tokenizer.ggml.tokens\[7\] is not valid UTF-8"):
        ft.from_gguf_metadata(meta, tmp_path / "m.gguf")


@pytest.fixture()
def hf_folder(tmp_path) -> Path:
    prepare_folders(tmp_path / "bases")
    folder = tmp_path / "tok"
    folder.mkdir()
    for f, blob in _FOLDERS["spm"].items():
        (folder / f).write_bytes(blob)
    return folder


def _refused(folder: Path, file: str, match: str) -> KilnError:
    with pytest.raises(KilnError, match=match) as e:
        ft.from_hf_folder(folder)
    fuzzing.check_error(e.value, [folder])
    assert e.value.path == str(folder / file)
    return e.value


@pytest.mark.parametrize("text,match", [("[" * 100000 + "]" * 100000, "nested too deeply"),
                                        ('{"version": ' + "9" * 5000 + "}", "digits")])
def test_regression_json_that_python_cannot_hold(hf_folder, text, match):
    # found by fuzz_hf_folder: RecursionError and ValueError (int digit limit) escaped json.load
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (hf_folder / name).write_text(text)
        _refused(hf_folder, name, match)
        (hf_folder / name).write_bytes(_FOLDERS["spm"][name])


def _template_from_chat_template_json(folder: Path) -> None:
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("name", ["tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                                  "chat_template.json", "tokenizer.json"])
@pytest.mark.parametrize("text", ["0", "[]", '"x"', "null"])
def test_regression_config_files_that_are_not_objects(hf_folder, name, text):
    # found by fuzz_hf_folder: a tokenizer_config.json or generation_config.json holding 0 raised
    # AttributeError ('int' object has no attribute 'get')
    _template_from_chat_template_json(hf_folder)
    (hf_folder / name).write_text(text)
    _refused(hf_folder, name, "not a JSON object")


def test_regression_template_naming_an_undefined_special_token(hf_folder):
    # found by fuzz_hf_folder: the tokenizers library loaded this post_processor, then its first
    # encode raised a Rust panic (pyo3 PanicException, a BaseException) past every except
    tj = json.loads((hf_folder / "tokenizer.json").read_text())
    pp = tj["post_processor"]
    pp["special_tokens"] = {"0": pp["special_tokens"]["<s>"]}
    (hf_folder / "tokenizer.json").write_text(json.dumps(tj))
    _refused(hf_folder, "tokenizer.json", "special token '<s>', which its special_tokens does not define")


def test_regression_library_panics_while_loading(hf_folder):
    # found by the second long run of fuzz_hf_folder: a BPE continuing_subword_prefix longer than
    # the merged tokens makes Tokenizer.from_str panic (slice index underflow in the library);
    # the PanicException, a BaseException, went past kiln's 'except Exception'
    tj = json.loads((hf_folder / "tokenizer.json").read_text())
    tj["model"]["continuing_subword_prefix"] = "__metadata__"
    (hf_folder / "tokenizer.json").write_text(json.dumps(tj))
    _refused(hf_folder, "tokenizer.json", "not a tokenizer the tokenizers library can load .range end index")


def test_regression_template_pieces_written_as_lists(hf_folder):
    # found by the long run of fuzz_hf_folder: the library takes a piece's fields as a list
    # ({"SpecialToken": ["<s>", 0]}, serde's sequence form of a struct); kiln called .get on it
    # (AttributeError)
    tj = json.loads((hf_folder / "tokenizer.json").read_text())
    pp = tj["post_processor"]
    pp["single"] = [{"SpecialToken": ["<s>", 0]}, {"Sequence": ["A", 0]}]
    (hf_folder / "tokenizer.json").write_text(json.dumps(tj))
    spec = ft.from_hf_folder(hf_folder)
    assert spec.add_bos and touch(spec) > 3
    pp["single"] = [{"SpecialToken": ["<t>", 0]}, {"Sequence": ["A", 0]}]
    (hf_folder / "tokenizer.json").write_text(json.dumps(tj))
    _refused(hf_folder, "tokenizer.json", "special token '<t>', which its special_tokens does not define")


def test_regression_special_token_that_is_a_lone_surrogate(hf_folder):
    # found by fuzz_hf_folder: bos_token "\ud800" (a JSON escape) made token_to_id raise
    # UnicodeEncodeError; such a name matches no token
    cfg = json.loads((hf_folder / "tokenizer_config.json").read_text())
    cfg["bos_token"] = "\ud800"
    (hf_folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    (hf_folder / "special_tokens_map.json").unlink()
    spec = ft.from_hf_folder(hf_folder)
    assert spec.bos_id == 1 and touch(spec) > 3       # generation_config.json's id


def test_chat_templates_that_are_not_text(hf_folder):
    # found while fixing the cases above: chat_template.jinja that is not UTF-8 raised
    # UnicodeDecodeError; a template list with unhashable names raised TypeError; a non-string
    # template was passed on to the runtime
    (hf_folder / "chat_template.jinja").write_bytes(b"{{ x }}\xff")
    _refused(hf_folder, "chat_template.jinja", "not UTF-8")
    (hf_folder / "chat_template.jinja").unlink()
    _template_from_chat_template_json(hf_folder)
    for value in ([{"name": [], "template": "x"}], [{"name": "default", "template": 5}]):
        (hf_folder / "chat_template.json").write_text(json.dumps({"chat_template": value}))
        _refused(hf_folder, "chat_template.json", "chat_template is")
    (hf_folder / "chat_template.json").write_text(json.dumps({"chat_template": 5}))
    assert ft.from_hf_folder(hf_folder).chat_template is None     # pick_template ignores what is no template


def test_regression_sparse_vocabulary_ids(hf_folder):
    # found by fuzz_hf_folder: one vocab id of 2**31 loaded fine; converting to GGUF then laid the
    # tokens out by id (to_gguf_metadata: [None] * 2**31) and raised MemoryError
    tj = json.loads((hf_folder / "tokenizer.json").read_text())
    tj["model"]["vocab"]["<0xD8>"] = 2**31
    (hf_folder / "tokenizer.json").write_text(json.dumps(tj))
    _refused(hf_folder, "tokenizer.json", "token ids run up to 2147483648, but there are only")


def test_ids_outside_the_vocabulary_are_ignored(hf_folder):
    (hf_folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, -1, True, 10**6, 3],
                                                                 "bos_token_id": 10**9}))
    spec = ft.from_hf_folder(hf_folder)
    assert spec.eos_ids == [2, 3] and spec.bos_id == 1


@pytest.mark.parametrize("name", ["fuzz_gguf_metadata", "fuzz_hf_folder"])
def test_fuzz(name, tmp_path):
    fuzzing.run_target(__file__, name, tmp_path)
