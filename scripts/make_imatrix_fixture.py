"""Write tests/data/imatrix/llama_imatrix.gguf: an importance matrix written by llama.cpp's own
``llama-imatrix``, for the test that kiln reads llama.cpp's files.

    python scripts/make_imatrix_fixture.py /path/to/llama-imatrix

The model is the llama test fixture (tests/data/fixtures/hf/llama: 2 layers, hidden 64,
vocabulary 256) given a byte-level BPE tokenizer with no merges (token i is byte i), written as
an F32 GGUF by kiln; llama-imatrix runs it over 64+ bytes of text in 2 windows of 32 tokens.
Only the small imatrix file is kept.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "data" / "imatrix" / "llama_imatrix.gguf"
TEXT = "The importance of a column is the mean square of its input. " * 3   # token i is byte i


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    alphabet = ByteLevel.alphabet()
    # GPT-2's byte -> printable character map, in byte order, so that token i is byte i
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    assert set(chars.values()) == set(alphabet)
    tok = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def main(llama_imatrix: str) -> None:
    from kiln.driver import load_model
    from kiln.frontends import gguf
    from kiln.frontends.tokenizer import TokenizerSpec
    model = load_model(ROOT / "tests" / "data" / "fixtures" / "hf" / "llama")
    model.tokenizer = TokenizerSpec(tokenizer=byte_tokenizer(), bos_id=1, eos_ids=[2], add_bos=False)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        gguf.write(model, d / "tiny.gguf", dtype="f32")
        (d / "calib.txt").write_text(TEXT)
        out = subprocess.run([llama_imatrix, "-m", "tiny.gguf", "-f", "calib.txt", "-c", "32",
                              "--chunks", "2", "-o", "imatrix.gguf", "--no-ppl", "-t", "2"],
                             capture_output=True, text=True, cwd=d)
        if out.returncode:
            sys.exit(out.stdout[-2000:] + out.stderr[-3000:])
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_bytes((d / "imatrix.gguf").read_bytes())
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main(sys.argv[1])
