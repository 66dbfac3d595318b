"""Models named by a Hugging Face hub ID (``kiln compile org/name``), fetched with
``huggingface_hub`` into its own cache.

The spelling follows llama.cpp's ``-hf``:

* ``org/name``: the repository's Hugging Face folder (config, tokenizer, chat template,
  safetensors); a repository of GGUF files only gives its ``Q4_K_M`` file, as llama.cpp does.
* ``org/name:QUANT``: the one ``.gguf`` file whose name holds QUANT (``org/name:Q8_0``, any case).
* ``org/name/FILE.gguf``: that file.

An argument is a hub ID only when no file or folder of that name exists and it has that
shape: ``./org/name`` or ``/org/name`` are paths, and so is ``dir/model.gguf`` (a model file's
name, not a repository's). The cache, ``HF_HOME``/``HF_HUB_CACHE``, ``HF_ENDPOINT``,
``HF_TOKEN`` and ``HF_HUB_OFFLINE`` are huggingface_hub's own, so a model fetched once needs no
network afterwards.
"""
from __future__ import annotations

import contextlib
import logging
import re
import sys
from pathlib import Path

from kiln.errors import KilnError

_PART = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
_ID = re.compile(rf"^(?P<repo>{_PART}/{_PART})(?::(?P<quant>[A-Za-z0-9_.-]+)|/(?P<file>[^/\\]+\.gguf))?$")
#: names of model files, which no one names a repository by
_FILE_SUFFIXES = (".gguf", ".safetensors", ".kiln", ".bin", ".onnx", ".json")

#: what a Hugging Face folder needs, and nothing else (no .bin or ONNX copies of the weights)
FOLDER_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt",
                "*.safetensors", "*.safetensors.index.json", "quantize_config.json"]
DEFAULT_QUANT = "Q4_K_M"

INSTALL = "pip install 'kiln[hub]'"


def parse(text: str) -> tuple[str, str | None, str | None] | None:
    """``(repo, quant, file)`` when ``text`` is shaped like a hub ID, else None."""
    m = _ID.match(text)
    if m is None or (m["quant"] is None and m["file"] is None and m["repo"].lower().endswith(_FILE_SUFFIXES)):
        return None
    return m["repo"], m["quant"], m["file"]


def is_hub_id(text) -> bool:
    return isinstance(text, str) and not Path(text).exists() and parse(text) is not None


def fetch(spec: str) -> Path:
    """The local path of the model ``spec`` names: a folder or a .gguf file in the cache."""
    repo, quant, file = parse(spec)
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        raise KilnError(spec, f"no such file or folder; to fetch it from the Hugging Face hub: {INSTALL}") from None
    if file is not None:
        return _one_gguf(spec, _download(spec, repo, [file]), lambda name: name == file, f"file {file}")
    if quant is not None:
        return _gguf_by_quant(spec, repo, quant)
    folder = _download(spec, repo, FOLDER_FILES)
    if (folder / "config.json").is_file():
        return folder
    # no Hugging Face folder in the repository: llama.cpp's default file of a GGUF repository
    try:
        return _gguf_by_quant(spec, repo, DEFAULT_QUANT)
    except KilnError:
        raise KilnError(spec, f"the repository has no config.json and no {DEFAULT_QUANT} GGUF file; name a "
                              f"file: {spec}:QUANT or {spec}/FILE.gguf") from None


def _gguf_by_quant(spec: str, repo: str, quant: str) -> Path:
    variants = {quant, quant.upper(), quant.lower()}
    folder = _download(spec, repo, [f"*{v}*.gguf" for v in sorted(variants)])
    return _one_gguf(spec, folder, lambda name: quant.lower() in name.lower(), f".gguf file with {quant} in its name")


def _one_gguf(spec: str, folder: Path, wanted, what: str) -> Path:
    found = sorted(p for p in folder.rglob("*.gguf") if wanted(p.name))
    if not found:
        raise KilnError(spec, f"the repository has no {what}")
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise KilnError(spec, f"several files match ({names}); name one: {spec.split(':')[0]}/FILE.gguf")
    return found[0]


def _download(spec: str, repo: str, patterns: list[str]) -> Path:
    """snapshot_download with kiln's one-line errors in place of huggingface_hub's."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)
    endpoint = constants.ENDPOINT
    if not sys.stderr.isatty():
        # its per-file bars are for a person watching; in a pipe or a log they are noise
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()
    advice = f"download it with `hf download {repo}` where the hub is reachable, or pass a local folder"
    try:
        with _quiet_warnings():
            return Path(snapshot_download(repo, allow_patterns=patterns))
    except GatedRepoError:
        raise KilnError(spec, f"the repository is gated on {endpoint}: accept its terms there and set "
                              "HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise KilnError(spec, f"no such file or folder, nor a model repository on {endpoint} (a private "
                              "one needs HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise KilnError(spec, f"{endpoint} has no main revision of the repository") from None
    except LocalEntryNotFoundError as e:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else _first_line(e.__cause__ or e)
        raise KilnError(spec, f"cannot reach the Hugging Face hub at {endpoint} ({why}) and the model is not "
                              f"in its cache; {advice}") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "an error"
        raise KilnError(spec, f"the Hugging Face hub at {endpoint} answered {status}; {advice}") from None
    except OSError as e:
        raise KilnError(spec, f"cannot write to the Hugging Face cache {constants.HF_HUB_CACHE} "
                              f"({e.strerror or e})") from None


@contextlib.contextmanager
def _quiet_warnings():
    # "No files matched" is a question kiln asks on purpose (is there a Hugging Face folder?)
    # and answers itself; errors still come up as exceptions
    log = logging.getLogger("huggingface_hub")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{e.__class__.__name__}: {text[0]}" if text else e.__class__.__name__


def cached_name(path) -> str | None:
    """The repository's name for a folder in huggingface_hub's cache (whose own name is a
    commit hash): what a compiled artifact is called by default."""
    p = Path(path)
    if p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--"):
        return p.parent.parent.name.split("--", 2)[-1]
    return None
