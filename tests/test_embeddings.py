"""Embedding models (sentence-transformers layout): a BERT encoder with mean pooling and a qwen3
decoder with last-token pooling give transformers' pooled, normalized vectors (made by
scripts/make_embedding_fixtures.py) through the IR, Model.embed, `kiln embed` and `kiln serve`."""
import base64
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from kiln.cli import main
from kiln.driver import compile as kiln_compile
from kiln.errors import KilnError
from kiln.frontends.detect import read_model
from kiln.interp import run as interpret
from kiln.runtime import embedding
from kiln.runtime.model import Model

DATA = Path(__file__).parent / "data" / "embeddings"
NAMES = ["bert_mean", "qwen3_last"]
TOL = 1e-4


def _ref(name):
    return json.loads((DATA / name / "reference.json").read_text())


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    out = tmp_path_factory.mktemp("embed")
    return {n: kiln_compile(DATA / n, output=out / f"{n}.kiln", backend="onnxrt") for n in NAMES}


def _padded(ids):
    n = max(map(len, ids))
    return (np.array([r + [0] * (n - len(r)) for r in ids]),
            np.array([[1] * len(r) + [0] * (n - len(r)) for r in ids]))


@pytest.mark.parametrize("name", NAMES)
def test_graph_equals_transformers_in_a_padded_batch(name):
    ref = _ref(name)
    m = read_model(DATA / name)
    assert m.embedding["pooling"] == [ref["pooling"].replace("_tokens", "").replace("lasttoken", "last")]
    ids, mask = _padded(ref["input_ids"])
    feeds = {"input_ids": ids, "attention_mask": mask}
    if m.embedding["token_types"]:
        feeds["token_type_ids"] = np.zeros_like(ids)
    got = interpret(m.graph, feeds)[m.graph.outputs[0].name]
    assert np.abs(got - np.array(ref["embeddings"])).max() <= TOL


@pytest.mark.parametrize("name", NAMES)
def test_model_embed_equals_transformers(artifacts, name):
    ref = _ref(name)
    model = Model(artifacts[name], threads=1)
    want = np.array(ref["embeddings"], dtype=np.float32)
    assert model.manifest["embedding"]["dimension"] == want.shape[1]
    assert model.manifest["backend"]["name"] == "onnxrt"
    for batch_size in (1, 2, 32):      # alone, in ragged pairs, all at once (padded)
        got = model.embed(ref["texts"], batch_size=batch_size)
        assert got.dtype == np.float32 and got.shape == want.shape
        assert np.abs(got - want).max() <= TOL
    assert np.abs(model.embed(ref["input_ids"]) - want).max() <= TOL
    one = model.embed(ref["texts"][1])
    assert one.shape == (1, want.shape[1]) and np.abs(one[0] - want[1]).max() <= TOL
    assert np.abs(model.embed(ref["input_ids"][0]) - want[:1]).max() <= TOL
    # the tokenizer adds the special tokens transformers adds ([CLS]/[SEP], the closing <|endoftext|>)
    encode = embedding.text_encoder(model.tokenizer)
    assert [encode(t) for t in ref["texts"]] == ref["input_ids"]


def test_model_embed_refuses_bad_inputs(artifacts):
    model = Model(artifacts["bert_mean"], threads=1)
    limit = model.manifest["embedding"]["max_seq_length"]
    with pytest.raises(ValueError, match="has 65 tokens; the model takes at most 64"):
        model.embed([[2] * (limit + 1)])
    assert model.embed([[2] * (limit + 1)], truncate=True).shape == (1, 32)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.embed([[2, 10_000]])
    with pytest.raises(ValueError, match="empty"):
        model.embed([[]])
    with pytest.raises(ValueError, match="embedding model computes vectors"):
        model.generate("the cat", max_new_tokens=2)


def test_decoder_artifact_has_no_embed(compiled_family):
    model = Model(compiled_family("llama", backend="onnxrt"), threads=1)
    with pytest.raises(ValueError, match="not an embedding model"):
        model.embed("hello")


POOLING_CASES = [(["cls"], True), (["max"], False), (["mean_sqrt_len"], True), (["cls", "mean", "last"], True)]


@pytest.mark.parametrize("modes,normalize", POOLING_CASES)
def test_pooling_modes_as_sentence_transformers_defines_them(modes, normalize):
    from kiln.frontends.pooling import add_pooling
    from kiln.ir import Graph
    rng = np.random.default_rng(0)
    h = rng.standard_normal((3, 5, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    g = Graph("pool")
    g.outputs = [g.add_input("hidden", "float32", ("batch", "seq", 4))]
    add_pooling(g, modes, normalize)
    got = interpret(g, {"hidden": h, "attention_mask": mask})[g.outputs[0].name]
    m = mask[:, :, None].astype(np.float32)
    want = {"cls": h[:, 0], "max": np.where(m > 0, h, -1e9).max(1),
            "mean": (h * m).sum(1) / m.sum(1), "mean_sqrt_len": (h * m).sum(1) / np.sqrt(m.sum(1)),
            "last": h[np.arange(3), mask.sum(1) - 1]}
    want = np.concatenate([want[k] for k in modes], axis=-1)
    if normalize:
        want = want / np.linalg.norm(want, axis=-1, keepdims=True)
    assert got.shape == want.shape and np.abs(got - want).max() < 1e-5


def _st_copy(tmp_path, edit):
    folder = tmp_path / "model"
    shutil.copytree(DATA / "bert_mean", folder)
    edit(folder)
    return folder


@pytest.mark.parametrize("edit,message", [
    (lambda f: (f / "modules.json").write_text(json.dumps(json.loads((f / "modules.json").read_text()) + [
        {"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"}])),
     "has a Dense module, which kiln does not compute"),
    (lambda f: (f / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_weightedmean_tokens": True})),
     "pooling mode 'weightedmean' is not one kiln computes"),
    (lambda f: (f / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": False})),
     "turns on no pooling mode"),
    (lambda f: (f / "modules.json").write_text("[{]"), "not a readable JSON list of modules"),
    (lambda f: (f / "modules.json").write_text(json.dumps(
        [{"path": "../elsewhere", "type": "sentence_transformers.models.Transformer"},
         {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}])),
     "module path '../elsewhere' points outside the folder"),
])
def test_unsupported_layouts_are_one_line_errors(tmp_path, edit, message):
    with pytest.raises(KilnError, match=message):
        read_model(_st_copy(tmp_path, edit))


def test_transformer_module_in_a_subfolder(tmp_path):
    """Older sentence-transformers folders keep the transformer in 0_Transformer/."""
    folder = tmp_path / "model"
    shutil.copytree(DATA / "bert_mean", folder / "0_Transformer",
                    ignore=shutil.ignore_patterns("modules.json", "1_Pooling", "reference.json"))
    shutil.copytree(DATA / "bert_mean" / "1_Pooling", folder / "1_Pooling")
    mods = json.loads((DATA / "bert_mean" / "modules.json").read_text())
    mods[0]["path"] = "0_Transformer"
    (folder / "modules.json").write_text(json.dumps(mods))
    ref = _ref("bert_mean")
    m = read_model(folder)
    ids, mask = _padded(ref["input_ids"])
    got = interpret(m.graph, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})
    assert np.abs(got[m.graph.outputs[0].name] - np.array(ref["embeddings"])).max() <= TOL
    assert m.tokenizer is not None


def test_compile_refusals(tmp_path, capsys):
    src = str(DATA / "qwen3_last")
    for args, message in ((["--quant", "q8_0"], "--quant is for decoder language models"),
                          (["--quant", "q4_k_m", "--backend", "tvm"], "--quant is for decoder language models")):
        assert main(["compile", src, "-o", str(tmp_path / "x.kiln"), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "x.kiln").exists()
    assert main(["convert", src, str(tmp_path / "x.gguf")]) == 2
    assert "is an embedding model; kiln convert writes decoder language models" in capsys.readouterr().err


@pytest.mark.parametrize("name", NAMES)
def test_tvm_embedder_equals_transformers(tmp_path, name):
    pytest.importorskip("tvm")
    ref = _ref(name)
    art = kiln_compile(DATA / name, output=tmp_path / "e.kiln", backend="tvm")
    model = Model(art, threads=1)
    assert model.manifest["backend"]["name"] == "tvm" and model.manifest["backend"]["entry_points"] == ["main"]
    want = np.array(ref["embeddings"], dtype=np.float32)
    for batch_size in (1, 32):
        assert np.abs(model.embed(ref["texts"], batch_size=batch_size) - want).max() <= TOL


def test_kiln_embed_json_and_table(artifacts, capsys, monkeypatch):
    ref = _ref("qwen3_last")
    art = str(artifacts["qwen3_last"])
    ids = ",".join(map(str, ref["input_ids"][2]))
    assert main(["embed", art, ref["texts"][0], ref["texts"][1], "--ids", ids, "--threads", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dimension"] == 32 and out["pooling"] == ["last"] and out["normalized"] is True
    got = np.array([d["embedding"] for d in out["data"]])
    assert np.abs(got - np.array(ref["embeddings"][:3])).max() <= TOL
    assert [d["tokens"] for d in out["data"]] == [len(r) for r in ref["input_ids"][:3]]
    assert main(["embed", art, ref["texts"][0], "--format", "table"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "first 4 of 32 values" in lines[0] and lines[1].rstrip().endswith(ref["texts"][0])
    assert f"{ref['embeddings'][0][0]:+.4f}" in lines[1]
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{ref['texts'][3]}\n\n{ref['texts'][4]}\n"))
    assert main(["embed", art, "-"]) == 0
    got = np.array([d["embedding"] for d in json.loads(capsys.readouterr().out)["data"]])
    assert np.abs(got - np.array(ref["embeddings"][3:])).max() <= TOL
    assert main(["embed", art, "--ids", "1,x"]) == 2
    assert "--ids '1,x' is not a comma-separated list" in capsys.readouterr().err


# ---- kiln serve -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(artifacts):
    from test_server_edge import Server
    servers = {n: Server(artifacts[n]) for n in NAMES}
    yield servers
    for s in servers.values():
        s.stop()


def test_openai_client_embeddings(served):
    openai = pytest.importorskip("openai")
    ref = _ref("bert_mean")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{served['bert_mean'].port}/v1", api_key="x", max_retries=0)
    want = np.array(ref["embeddings"], dtype=np.float32)
    # unless told, the client asks for base64 and decodes it; told, it hands back what came
    for fmt in ("float", None, "base64"):
        r = client.embeddings.create(model="bert_mean", input=ref["texts"],
                                     **({"encoding_format": fmt} if fmt else {}))
        rows = [d.embedding for d in sorted(r.data, key=lambda d: d.index)]
        got = np.array([np.frombuffer(base64.b64decode(x), "<f4") for x in rows] if fmt == "base64" else rows,
                       dtype=np.float32)
        assert np.abs(got - want).max() <= TOL
        assert r.usage.prompt_tokens == r.usage.total_tokens == sum(map(len, ref["input_ids"]))
    r = client.embeddings.create(model="bert_mean", input=ref["input_ids"][3])       # one list of ids
    assert len(r.data) == 1 and np.abs(np.array(r.data[0].embedding) - want[3]).max() <= TOL
    r = client.embeddings.create(model="bert_mean", input=ref["texts"][2])           # one text
    assert np.abs(np.array(r.data[0].embedding) - want[2]).max() <= TOL


def test_embeddings_endpoint_over_http(served):
    ref = _ref("qwen3_last")
    s = served["qwen3_last"]
    want = np.array(ref["embeddings"], dtype=np.float32)
    status, body = s.request("POST", "/v1/embeddings", {"input": ref["input_ids"], "encoding_format": "base64"})
    assert status == 200 and body["object"] == "list" and body["model"] == "qwen3_last"
    got = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in body["data"]])
    assert [d["index"] for d in body["data"]] == list(range(len(want))) and np.abs(got - want).max() <= TOL
    status, body = s.request("POST", "/v1/embeddings", {"input": ref["texts"][:2]})
    assert status == 200 and np.abs(np.array([d["embedding"] for d in body["data"]]) - want[:2]).max() <= TOL
    for bad, param in (({"input": []}, "input"), ({"input": [""]}, "input"), ({"input": [[1, 9999]]}, "input"),
                       ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
                       ({"input": "a", "dimensions": 8}, "dimensions"), ({"input": [1.5]}, "input")):
        status, body = s.request("POST", "/v1/embeddings", bad)
        assert status == 422 and body["error"]["param"] == param, (bad, body)
    status, body = s.request("POST", "/v1/embeddings", {"input": [[2] * 65]})
    assert status == 413 and body["error"]["code"] == "context_length_exceeded"
    status, body = s.request("POST", "/v1/embeddings", {"input": "a", "model": "other"})
    assert status == 404
    status, body = s.request("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 400 and body["error"]["code"] == "model_is_embedding"


def test_embeddings_endpoint_refuses_a_decoder():
    from types import SimpleNamespace

    from kiln.runtime.embeddings_api import respond
    from kiln.runtime.http_limits import APIError
    service = SimpleNamespace(model=SimpleNamespace(embedding=None), names=["smol"], name="smol")
    with pytest.raises(APIError) as e:
        respond(service, {"input": "hello"})
    assert e.value.status == 400 and e.value.code == "model_not_embedding"


def test_inspect_names_the_pooling(artifacts, capsys):
    line = "embedding model: last pooling, normalized, 32 dimensions, at most 64 tokens per input"
    assert main(["inspect", str(DATA / "qwen3_last")]) == 0
    out = capsys.readouterr().out
    assert "sentence-transformers folder, architecture qwen3" in out and line in out
    assert main(["inspect", str(artifacts["qwen3_last"])]) == 0
    assert line in capsys.readouterr().out
