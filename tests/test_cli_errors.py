"""Bad input gets one clear line naming the file, exit code 2, no traceback, no artifact left."""
import json
import subprocess
import sys

import numpy as np
import pytest


def kiln(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "kiln.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def assert_user_error(proc, path, words):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert str(path) in lines[0]
    assert words in lines[0], lines[0]


def _gguf(path, arch="llama", tensor_type=None):
    import gguf
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    if tensor_type is None:
        w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    else:
        raw = np.zeros((8, gguf.GGML_QUANT_SIZES[tensor_type][1]), np.uint8)
        w.add_tensor("token_embd.weight", raw, raw_shape=raw.shape, raw_dtype=tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


CASES = {
    "missing file": lambda tmp: (tmp / "nope.gguf", "no such file"),
    "folder that is not a model": lambda tmp: ((tmp / "empty").mkdir() or tmp / "empty", "no config.json"),
    "unsupported HF architecture": lambda tmp: _hf_config(tmp, {"model_type": "bert"}),
    "unsupported GGUF architecture": lambda tmp: (_gguf(tmp / "m.gguf", arch="mamba"), "unsupported architecture 'mamba'"),
    "not a GGUF": lambda tmp: (_write(tmp / "x.gguf", b"hello world" * 10), "not a GGUF file"),
}


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _hf_config(tmp, cfg):
    d = tmp / "hfmodel"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return d, "unsupported architecture 'bert'"


@pytest.mark.parametrize("case", list(CASES))
def test_compile_refuses_bad_input(tmp_path, case):
    src, words = CASES[case](tmp_path)
    out = tmp_path / "out.kiln"
    proc = kiln("compile", src, "-o", out)
    assert_user_error(proc, src, words)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.kiln")]


def test_unsupported_tensor_type(tmp_path):
    import gguf
    src = _gguf(tmp_path / "iq.gguf", tensor_type=gguf.GGMLQuantizationType.Q8_K)
    proc = kiln("compile", src, "-o", tmp_path / "o.kiln")
    assert_user_error(proc, src, "Q8_K")
    assert not (tmp_path / "o.kiln").exists()


def test_truncated_gguf(tmp_path, smollm2_gguf):
    src = tmp_path / "cut.gguf"
    with open(smollm2_gguf, "rb") as f:
        src.write_bytes(f.read(20_000_000))
    proc = kiln("compile", src, "-o", tmp_path / "o.kiln")
    assert_user_error(proc, src, "end of the file")
    assert not (tmp_path / "o.kiln").exists()


def test_run_on_a_folder_that_is_not_an_artifact(tmp_path):
    proc = kiln("run", tmp_path, "--prompt", "hi")
    assert_user_error(proc, tmp_path, "not a kiln artifact")
