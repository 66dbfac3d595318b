"""Importance matrices: ``kiln imatrix``, the imatrix file (llama.cpp's GGUF layout, and the
legacy .dat), and quantizers weighted by one as llama.cpp's quantize_row_*_impl are."""
import struct
from pathlib import Path

import numpy as np
import pytest
from test_quantize import make_wide_llama

from kiln import formats, imatrix, imatrix_file
from kiln.cli import main
from kiln.driver import convert, load_model
from kiln.errors import KilnError
from kiln.frontends.arch import FAMILIES
from kiln.frontends.gguf_file import read_gguf

DATA = Path(__file__).parent / "data" / "imatrix"
WEIGHTED = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q4_0", "q4_1", "q5_0", "q5_1"]


# ---- the quantizers ---------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", WEIGHTED)
def test_weighted_quantizer_equals_llama_cpp(fmt):
    # bytes from ggml_quantize_chunk with an importance array (scripts/make_imatrix_quant_cases.py):
    # zero runs, a constant row, an all-zero row, rows of 1e-20 and 1e4, zero-importance columns
    case = np.load(DATA / "quant_cases.npz")
    got = formats.get(fmt).quantize(case["x"], case["importance"])
    assert np.array_equal(got, case[fmt])


@pytest.mark.parametrize("fmt", WEIGHTED)
def test_importance_lowers_the_error_it_weights(fmt):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((16, 512)).astype(np.float32)
    imp = (10 * rng.random(512) ** 4).astype(np.float32)       # a few columns matter much more
    f = formats.get(fmt)

    def err(raw):
        return float((imp * (f.dequantize(raw, x.shape) - x) ** 2).sum())
    plain, weighted = err(f.quantize(x)), err(f.quantize(x, imp))
    assert weighted < 0.95 * plain, (plain, weighted)


def test_formats_llama_cpp_quantizes_alike_ignore_importance():
    x = np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)
    imp = np.linspace(0, 5, 256, dtype=np.float32)
    for name in ("q8_0", "f16", "bf16"):
        f = formats.get(name)
        assert not f.takes_importance
        assert np.array_equal(f.quantize(x, imp), f.quantize(x))


def test_importance_of_another_width_is_refused():
    x = np.zeros((2, 256), np.float32)
    with pytest.raises(ValueError, match="importance has 128 values for rows of 256"):
        formats.get("q4_k").quantize(x, np.ones(128, np.float32))


# ---- the file ---------------------------------------------------------------------------------

def _matrix():
    rng = np.random.default_rng(1)
    return imatrix_file.ImportanceMatrix(
        {"blk.0.attn_q.weight": imatrix_file.Entry(rng.random(256).astype(np.float32) * 40, np.array([40.0])),
         "blk.0.ffn_down.weight": imatrix_file.Entry(rng.random(512).astype(np.float32), np.array([0.0]))},
        datasets=["calibration.txt"], chunk_count=5, chunk_size=8)


def test_file_round_trips(tmp_path):
    im = _matrix()
    imatrix_file.write(tmp_path / "im.gguf", im)
    back = imatrix_file.read(tmp_path / "im.gguf")
    assert (back.datasets, back.chunk_count, back.chunk_size, back.legacy) == (["calibration.txt"], 5, 8, False)
    assert set(back.entries) == set(im.entries)
    for name, e in im.entries.items():
        assert np.array_equal(back.entries[name].sums, e.sums)
        assert np.array_equal(back.entries[name].counts, e.counts)
    q = back.importance("blk.0.attn_q.weight")
    assert np.array_equal(q, im.entries["blk.0.attn_q.weight"].sums / np.float32(40))
    # llama-quantize gives an entry that counted nothing weight 1 everywhere
    assert np.array_equal(back.importance("blk.0.ffn_down.weight"), np.ones(512, np.float32))
    assert back.importance("blk.1.attn_q.weight") is None


def test_file_has_llama_cpp_layout(tmp_path):
    imatrix_file.write(tmp_path / "im.gguf", _matrix())
    f = read_gguf(tmp_path / "im.gguf")
    assert f.metadata["general.type"] == "imatrix"
    assert str(f.metadata_types["imatrix.datasets"]) == "array[string]"
    assert str(f.metadata_types["imatrix.chunk_count"]) == str(f.metadata_types["imatrix.chunk_size"]) == "uint32"
    # sorted by matrix name, sums then counts, F32 [n_mat, columns] and [n_mat, 1], 1-D for one matrix
    assert list(f.tensors) == ["blk.0.attn_q.weight.in_sum2", "blk.0.attn_q.weight.counts",
                               "blk.0.ffn_down.weight.in_sum2", "blk.0.ffn_down.weight.counts"]
    assert f.tensors["blk.0.attn_q.weight.in_sum2"].shape == (256,)
    assert f.tensors["blk.0.attn_q.weight.counts"].shape == (1,)
    assert {w.format.name for w in f.tensors.values()} == {"f32"}


def test_legacy_dat_reads(tmp_path):
    # tools/imatrix's save_imatrix_legacy: entries of (name, ncall, values = mean * ncall),
    # then the chunk count and the dataset
    values = np.arange(1, 9, dtype=np.float32) * 3
    name = b"blk.2.ffn_up.weight"
    data = struct.pack("<i", 1) + struct.pack("<i", len(name)) + name + struct.pack("<ii", 3, 8) + values.tobytes()
    data += struct.pack("<i", 3) + struct.pack("<i", 9) + b"wiki.text"
    (tmp_path / "im.dat").write_bytes(data)
    im = imatrix_file.read(tmp_path / "im.dat")
    assert im.legacy and im.chunk_count == 3 and im.datasets == ["wiki.text"]
    assert np.array_equal(im.importance("blk.2.ffn_up.weight"), values / np.float32(3))


def test_llama_cpp_written_file_reads_and_rewrites_byte_for_byte(tmp_path):
    # written by the vendored llama.cpp's llama-imatrix: scripts/make_imatrix_fixture.py (the
    # llama fixture with a byte-level vocabulary, 2 windows of 32 tokens)
    im = imatrix_file.read(DATA / "llama_imatrix.gguf")
    assert (im.chunk_size, im.chunk_count, im.datasets) == (32, 2, ["calib.txt"])
    assert len(im.entries) == 14
    e = im.entries["blk.0.attn_q.weight"]
    assert e.sums.shape == (64,) and list(e.counts) == [64]
    imatrix_file.write(tmp_path / "again.gguf", im)
    assert (tmp_path / "again.gguf").read_bytes() == (DATA / "llama_imatrix.gguf").read_bytes()


def test_collect_equals_llama_imatrix(hf_fixture):
    # the same model and text as the fixture (token i is byte i; no BOS): llama.cpp keeps its
    # attention's K/V in f16, hence the 1e-3
    text = "The importance of a column is the mean square of its input. " * 3
    ours = imatrix.collect(load_model(hf_fixture("llama")), list(text.encode()), ctx=32, chunks=2)
    theirs = imatrix_file.read(DATA / "llama_imatrix.gguf")
    assert set(ours.entries) == set(theirs.entries)
    for name, e in theirs.entries.items():
        assert list(ours.entries[name].counts) == list(e.counts)
        np.testing.assert_allclose(ours.entries[name].sums, e.sums, rtol=2e-3, err_msg=name)


@pytest.mark.parametrize("content", [b"not an importance matrix at all", b""])
def test_not_an_imatrix_is_one_line(tmp_path, content, capsys):
    (tmp_path / "x.dat").write_bytes(content)
    with pytest.raises(KilnError, match="neither a GGUF nor a legacy .dat importance matrix"):
        imatrix_file.read(tmp_path / "x.dat")


def test_a_model_gguf_is_not_an_imatrix(tmp_path, hf_fixture):
    convert(hf_fixture("llama"), tmp_path / "m.gguf", to="gguf", dtype="f32")
    with pytest.raises(KilnError, match="is a GGUF model, not an importance matrix"):
        imatrix_file.read(tmp_path / "m.gguf")


# ---- collecting -------------------------------------------------------------------------------

def test_collect_sums_the_squared_inputs_of_each_matrix(hf_fixture):
    model = load_model(hf_fixture("llama"))
    ids = list(np.random.default_rng(2).integers(3, model.config["vocab_size"], 40))
    im = imatrix.collect(model, ids, ctx=16, chunks=None)
    assert im.chunk_count == 2 and im.chunk_size == 16          # whole windows only: 40 tokens, 2 windows
    assert sorted(im.entries) == sorted(f"blk.{i}.{n}.weight" for i in range(2) for n in
                                        ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"))
    assert all(list(e.counts) == [32] for e in im.entries.values())
    # layer 0's q/k/v read the first norm of the embeddings
    emb = model.weights["embed"].numpy()[np.asarray(ids[:32])]
    w = model.weights["layers.0.attn_norm"].numpy()
    x = emb / np.sqrt((emb * emb).mean(-1, keepdims=True) + model.config["norm_eps"]) * w
    np.testing.assert_allclose(im.entries["blk.0.attn_q.weight"].sums, (x * x).sum(0), rtol=1e-5)
    assert np.array_equal(im.entries["blk.0.attn_k.weight"].sums, im.entries["blk.0.attn_q.weight"].sums)
    assert np.array_equal(im.entries["blk.1.ffn_gate.weight"].sums, im.entries["blk.1.ffn_up.weight"].sums)
    assert imatrix.collect(model, ids, ctx=16, chunks=1).chunk_count == 1
    with pytest.raises(KilnError, match="fewer than one window of --ctx 64"):
        imatrix.collect(model, ids, ctx=64)


def test_fused_matrices_take_the_fused_name():
    assert imatrix.gguf_name("layers.3.q.weight", FAMILIES["llama"]) == "blk.3.attn_q.weight"
    assert imatrix.gguf_name("layers.3.v.weight", FAMILIES["phi3"]) == "blk.3.attn_qkv.weight"
    assert imatrix.gguf_name("layers.3.gate.weight", FAMILIES["phi3"]) == "blk.3.ffn_up.weight"
    assert imatrix.gguf_name("layers.3.attn_norm", FAMILIES["llama"]) is None
    assert imatrix.gguf_name("embed", FAMILIES["llama"]) is None


def test_cli_imatrix_on_smollm2(smollm2_gguf, tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    out = tmp_path / "im.gguf"
    assert main(["imatrix", str(smollm2_gguf), "--text", str(text), "--ctx", "16", "--chunks", "2",
                 "-o", str(out), "-q"]) == 0
    im = imatrix_file.read(out)
    assert len(im.entries) == 30 * 7 and im.chunk_count == 2 and im.datasets == [str(text)]
    assert im.entries["blk.29.ffn_down.weight"].sums.shape == (1536,)
    assert "wrote" in capsys.readouterr().err


# ---- --imatrix --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    d = tmp_path_factory.mktemp("wide")
    folder = make_wide_llama(d / "hf")
    model = load_model(folder)
    ids = list(np.random.default_rng(4).integers(0, 512, 64))
    imatrix_file.write(d / "im.gguf", imatrix.collect(model, ids, ctx=32, dataset="random ids"))
    return folder, d / "im.gguf"


def test_convert_with_imatrix_weights_the_layers(wide, tmp_path):
    folder, im_path = wide
    convert(folder, tmp_path / "plain.gguf", to="gguf", quant="q3_k_s")
    convert(folder, tmp_path / "im.gguf", to="gguf", quant="q3_k_s", imatrix=im_path)
    plain, weighted = read_gguf(tmp_path / "plain.gguf"), read_gguf(tmp_path / "im.gguf")
    im = imatrix_file.read(im_path)
    for name, t in weighted.tensors.items():
        raw = t.raw()
        if name in im.entries:
            assert not np.array_equal(raw, plain.tensors[name].raw()), name
        else:
            assert np.array_equal(raw, plain.tensors[name].raw()), name      # no entry: as without
    m = weighted.metadata
    assert m["quantize.imatrix.file"] == str(im_path)
    assert m["quantize.imatrix.dataset"] == "random ids"
    assert m["quantize.imatrix.entries_count"] == 56 and m["quantize.imatrix.chunks_count"] == 2


def test_compile_with_imatrix_quantizes_as_convert(wide, tmp_path):
    from kiln.passes.quantize import quantize
    from kiln.quant_schemes import Layout
    folder, im_path = wide
    from kiln.driver import _importance_by_role
    model = load_model(folder)
    importance = _importance_by_role(im_path, model)
    assert len(importance) == 56
    r = quantize(model.graph, "q4_k_m", Layout.of(model.config, FAMILIES["llama"]), importance=importance)
    assert r.stats and model.graph.meta["quantization"]["imatrix_tensors"] == 56
    convert(folder, tmp_path / "im.gguf", to="gguf", quant="q4_k_m", imatrix=im_path)
    down = read_gguf(tmp_path / "im.gguf").tensors["blk.5.ffn_down.weight"]
    assert np.array_equal(model.graph.weights["layers.5.down.weight"].weight.raw(), down.raw())


def test_imatrix_for_another_model_is_one_line(wide, hf_fixture, tmp_path, capsys):
    _, im_path = wide                                   # rows of 256; the llama fixture's are 64
    src = hf_fixture("llama")
    rc = main(["convert", str(src), str(tmp_path / "x.gguf"), "--to", "gguf", "--quant", "q4_0",
               "--imatrix", str(im_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert "is an importance matrix for another model: blk.0.attn_k.weight has 256 columns here, 64 in the model" in err
    assert not (tmp_path / "x.gguf").exists()
    other = imatrix_file.ImportanceMatrix({"blk.0.mystery.weight": imatrix_file.Entry(np.ones(8, np.float32), np.ones(1))},
                                          datasets=["x"], chunk_count=1, chunk_size=8)
    imatrix_file.write(tmp_path / "other.gguf", other)
    rc = main(["compile", str(src), "-o", str(tmp_path / "x.kiln"), "--quant", "q4_0",
               "--imatrix", str(tmp_path / "other.gguf")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "none of its entries (blk.0.mystery.weight, ...) is a matrix of this one" in err


def test_imatrix_needs_quant(wide, tmp_path, capsys):
    folder, im_path = wide
    rc = main(["convert", str(folder), str(tmp_path / "x.gguf"), "--to", "gguf", "--imatrix", str(im_path)])
    assert rc == 2 and "--imatrix weights the quantizers: it needs --quant" in capsys.readouterr().err


def test_cli_imatrix_errors_are_one_line(hf_fixture, tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text("some text " * 50)
    src = str(hf_fixture("llama"))
    cases = [
        (["--text", str(tmp_path / "missing.txt")], "missing.txt: cannot read"),
        (["--text", str(text)], "has no tokenizer to read the calibration text with"),
        (["--text", str(text), "--ctx", "8"], "--ctx 8 is too small"),
        (["--text", str(text), "--chunks", "0"], "--chunks 0: give a positive number of windows"),
    ]
    for extra, message in cases:
        rc = main(["imatrix", src, "-o", str(tmp_path / "im.gguf"), *extra])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and message in err and "\n" not in err, err
    assert not (tmp_path / "im.gguf").exists()
