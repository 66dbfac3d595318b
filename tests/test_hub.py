"""Hugging Face hub IDs (``kiln compile org/name``) against a stand-in for the hub's HTTP API on
127.0.0.1 (tests/hub_mock.py): HF_ENDPOINT and HF_HOME point at it and at a temporary cache."""
import os
import socket
import subprocess
import sys

import pytest
from conftest import HF_FIXTURES
from hub_mock import HubMock

LLAMA = HF_FIXTURES / "llama"
REPO, GGUF_REPO = "kiln-test/tiny-llama", "kiln-test/tiny-llama-gguf"


def kiln(*args, env, cwd):
    return subprocess.run([sys.executable, "-m", "kiln.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env={**os.environ, "KILN_DEBUG": "", **env})


def one_line_error(r, *words):
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    from kiln import convert
    out = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    convert(LLAMA, out, to="gguf", quiet=True)
    return out


@pytest.fixture(scope="module")
def hub(gguf):
    # the fixture folder as a model repository (with a file kiln must not fetch), and a
    # repository of GGUF files only, named as llama.cpp's quantizations are
    folder = {p.name: p for p in LLAMA.iterdir()}
    ggufs = {"tiny-llama-F32.gguf": gguf, "tiny-llama-Q4_K_M.gguf": gguf, "README.md": LLAMA / "config.json"}
    with HubMock({REPO: folder, GGUF_REPO: ggufs}) as mock:
        yield mock


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("hf-home")


@pytest.fixture
def env(hub, cache):
    return {"HF_ENDPOINT": hub.url, "HF_HOME": str(cache), "HF_HUB_OFFLINE": ""}


def test_compile_from_a_hub_id(env, hub, tmp_path):
    r = kiln("compile", REPO, "-q", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    # named after the repository, not the cache's commit folder
    art = tmp_path / "tiny-llama.kiln"
    assert (art / "manifest.json").is_file(), os.listdir(tmp_path)
    # the model files only: not reference.npz, which the repository also holds
    got = {req.rsplit("/", 1)[-1] for req in hub.requests if req.startswith("GET") and "/resolve/" in req}
    assert "config.json" in got and "model-00004-of-00004.safetensors" in got and "reference.npz" not in got
    # the same model as the local folder compiles to
    local = kiln("compile", LLAMA, "-o", tmp_path / "local.kiln", "-q", env=env, cwd=tmp_path)
    assert local.returncode == 0, local.stderr
    runs = [kiln("run", a, "--ids", "1,2,3", "-n", "4", env=env, cwd=tmp_path) for a in (art, tmp_path / "local.kiln")]
    assert runs[0].returncode == 0 and runs[0].stdout == runs[1].stdout, runs


def test_a_fetched_model_needs_no_network_afterwards(env, tmp_path):
    assert kiln("inspect", REPO, env=env, cwd=tmp_path).returncode == 0
    offline = kiln("inspect", REPO, env={**env, "HF_HUB_OFFLINE": "1"}, cwd=tmp_path)
    assert offline.returncode == 0 and "llama" in offline.stdout, offline.stderr
    # with the hub unreachable, the cache serves too
    unreachable = kiln("inspect", REPO, env={**env, "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}, cwd=tmp_path)
    assert unreachable.returncode == 0, unreachable.stderr


def test_convert_from_a_hub_id(env, tmp_path):
    r = kiln("convert", REPO, tmp_path / "out.gguf", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out.gguf").read_bytes()[:4] == b"GGUF"


def test_gguf_files_by_quantization_or_name(env, hub, tmp_path):
    hub.requests.clear()
    r = kiln("inspect", f"{GGUF_REPO}:f32", "--json", env=env, cwd=tmp_path)
    assert r.returncode == 0 and "tiny-llama-F32.gguf" in r.stdout, r.stderr
    fetched = [q for q in hub.requests if q.startswith("GET") and "/resolve/" in q]
    assert len(fetched) == 1 and fetched[0].endswith("tiny-llama-F32.gguf"), hub.requests
    # no tag in a repository of GGUF files: its Q4_K_M file, as llama.cpp's -hf picks
    r = kiln("inspect", GGUF_REPO, "--json", env=env, cwd=tmp_path)
    assert r.returncode == 0 and "tiny-llama-Q4_K_M.gguf" in r.stdout, r.stderr
    r = kiln("inspect", f"{GGUF_REPO}/tiny-llama-F32.gguf", "--json", env=env, cwd=tmp_path)
    assert r.returncode == 0 and "tiny-llama-F32.gguf" in r.stdout, r.stderr
    one_line_error(kiln("inspect", f"{GGUF_REPO}:q8_0", env=env, cwd=tmp_path),
                   f"{GGUF_REPO}:q8_0:", "the repository has no .gguf file with q8_0 in its name")


def test_hf_token_is_sent(env, hub, tmp_path):
    hub.tokens.clear()
    r = kiln("inspect", REPO, env={**env, "HF_TOKEN": "hf_kilntest", "HF_HOME": str(tmp_path / "cache")}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert hub.tokens and "Bearer hf_kilntest" in hub.tokens, hub.tokens


def test_a_missing_repository_is_one_line(env, tmp_path):
    one_line_error(kiln("compile", "kiln-test/no-such-model", env=env, cwd=tmp_path),
                   "kiln: kiln-test/no-such-model: no such file or folder, nor a model repository on "
                   f"{env['HF_ENDPOINT']}")
    assert not any(tmp_path.iterdir())


def test_an_unreachable_hub_is_one_line(tmp_path):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    env = {"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "empty-cache"), "HF_HUB_OFFLINE": ""}
    for command in (["compile", REPO], ["convert", REPO, tmp_path / "x.gguf"], ["inspect", REPO]):
        one_line_error(kiln(*command, env=env, cwd=tmp_path),
                       f"kiln: {REPO}: cannot reach the Hugging Face hub at {endpoint} (",
                       "the model is not in its cache; download it with `hf download kiln-test/tiny-llama`")
    one_line_error(kiln("inspect", REPO, env={**env, "HF_HUB_OFFLINE": "1"}, cwd=tmp_path),
                   "(HF_HUB_OFFLINE is set)")


def test_paths_are_not_hub_ids(tmp_path, monkeypatch):
    from kiln.frontends.hub import is_hub_id, parse
    assert parse("org/name") == ("org/name", None, None)
    assert parse("org/name:Q4_K_M") == ("org/name", "Q4_K_M", None)
    assert parse("org/name/model-q8_0.gguf") == ("org/name", None, "model-q8_0.gguf")
    for path in ("./org/name", "/org/name", "org", "a/b/c", "dir/model.gguf", "dir/model.safetensors"):
        assert parse(path) is None or not is_hub_id(path), path
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert not is_hub_id("org/name")            # an existing folder of that name is a folder
    # a missing model file is a missing file, with no trip to the hub
    r = kiln("inspect", "models/model.gguf", env={"HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}, cwd=tmp_path)
    one_line_error(r, "models/model.gguf: no such file or folder")


def test_without_huggingface_hub_the_error_says_what_to_install(monkeypatch):
    from kiln.errors import KilnError
    from kiln.frontends import hub
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(KilnError, match=r"org/name: no such file or folder; to fetch it from the Hugging Face "
                                        r"hub: pip install 'kiln\[hub\]'"):
        hub.fetch("org/name")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
