"""Regenerate the PyTorch checkpoint fixtures in tests/data/torch_bin/.

Needs torch and numpy, which the kiln venv deliberately does not have. Use a throwaway venv:

    python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch==2.13.0 numpy
    /tmp/torchvenv/bin/python scripts/make_torch_bin_fixtures.py

Writes a few tiny checkpoints (a few KB each), ``expected.npz`` with every tensor's values as
float64/int64 keyed ``"<file stem>.<tensor name>"``, and one hostile checkpoint whose pickle
would run ``touch /tmp/kiln_pwned_<random>`` if anything executed it (its marker path goes in
``malicious_marker.txt`` so the test knows what must not appear).
"""
from __future__ import annotations

import collections
import io
import os
import secrets
import sys
import zipfile

import numpy as np
import torch

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "torch_bin")


def basic_state() -> "collections.OrderedDict[str, torch.Tensor]":
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 4, generator=g)
    wide = torch.randn(3, 5, generator=g)
    sd = collections.OrderedDict()
    sd["linear.weight"] = torch.randn(4, 3, generator=g)
    sd["linear.bias"] = torch.randn(4, generator=g).half()
    sd["emb"] = torch.randn(5, 2, generator=g).bfloat16()
    sd["f64"] = torch.randn(3, generator=g).double()
    sd["steps"] = torch.arange(6, dtype=torch.int64) - 2
    sd["i32"] = torch.tensor([1, -2, 3], dtype=torch.int32)
    sd["i16"] = torch.tensor([[7, -8]], dtype=torch.int16)
    sd["i8"] = torch.tensor([-128, 0, 127], dtype=torch.int8)
    sd["transposed"] = wide.t()                 # non-contiguous: strides (1, 5)
    sd["shared_a"] = base[0]                     # these three share one storage
    sd["shared_b"] = base[1:]                    # ... at an element offset
    sd["shared_col"] = base[:, 1]                # ... strided, offset 1
    sd["scalar"] = torch.tensor(2.5)
    sd["empty"] = torch.zeros(0, 3)
    return sd


def nested_state() -> dict:
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    return {
        "model": model.state_dict(),             # an OrderedDict carrying _metadata (a BUILD)
        "epoch": 3,
        "config": {"lr": 0.1, "name": "tiny", "betas": (0.9, 0.99)},
        "history": [torch.tensor([1.0, 2.0])],
    }


def param_state() -> dict:
    g = torch.Generator().manual_seed(2)
    return {
        "p": torch.nn.Parameter(torch.randn(2, 2, generator=g)),
        "q": torch.nn.Parameter(torch.randn(3, generator=g), requires_grad=False),
    }


def flat(prefix: str, obj, out: dict) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        out[prefix] = (t.double() if t.is_floating_point() else t.long()).numpy()
    elif isinstance(obj, dict):
        for k, v in obj.items():
            flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            flat(f"{prefix}.{i}" if prefix else str(i), v, out)


def malicious_zip(marker: str) -> bytes:
    # Protocol-2 pickle by hand: GLOBAL os.system, then REDUCE with the command. The layout is a
    # real torch zip so a loader cannot reject it for its container before reaching the pickle.
    cmd = f"touch {marker}".encode()
    pkl = (b"\x80\x02" + b"cos\nsystem\n" + b"X" + len(cmd).to_bytes(4, "little") + cmd
           + b"\x85R." )
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
    return buf.getvalue()


def main() -> int:
    os.makedirs(OUT, exist_ok=True)
    expected: dict[str, np.ndarray] = {}

    basic = basic_state()
    torch.save(basic, os.path.join(OUT, "basic.bin"))
    flat("basic", basic, expected)

    torch.save(basic, os.path.join(OUT, "legacy.bin"), _use_new_zipfile_serialization=False)
    flat("legacy", basic, expected)

    nested = nested_state()
    torch.save(nested, os.path.join(OUT, "nested.bin"))
    flat("nested", nested, expected)

    params = param_state()
    torch.save(params, os.path.join(OUT, "param.bin"))
    flat("param", params, expected)

    np.savez(os.path.join(OUT, "expected.npz"), **expected)

    marker = f"/tmp/kiln_pwned_{secrets.token_hex(8)}"
    with open(os.path.join(OUT, "malicious_os_system.bin"), "wb") as f:
        f.write(malicious_zip(marker))
    with open(os.path.join(OUT, "malicious_marker.txt"), "w") as f:
        f.write(marker + "\n")

    total = sum(os.path.getsize(os.path.join(OUT, n)) for n in os.listdir(OUT))
    print(f"wrote {len(os.listdir(OUT))} files, {total} bytes, to {os.path.normpath(OUT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
