"""Embedding artifacts at run time: inputs in, one vector per input out (ONNX Runtime here,
TVM in :mod:`kiln.runtime.tvm_embedding`).

An embedder's graph (see kiln.frontends.sentence_transformers) takes ``input_ids``, an
``attention_mask`` and, for BERT's family, ``token_type_ids``, and returns the pooled,
normalized vectors; nothing is cached between calls. Inputs of different lengths run as
right-padded batches whose mask keeps each row's vector what it is alone (to float rounding):
the encoder masks padded keys, a decoder's causal attention never looks ahead to them, and
the pooling skips them. Inputs are sorted by length first, so a batch pads little.

Texts are tokenized as sentence-transformers tokenizes them: with the tokenizer's own special
tokens (BERT's ``[CLS] ... [SEP]``, Qwen3-Embedding's closing ``<|endoftext|>``). Token ids are
taken as they are, special tokens included: they are the model's input, as OpenAI's API
defines token inputs.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from kiln.artifact import ArtifactError

#: inputs per ONNX Runtime call
BATCH = 32


def open_session(folder, manifest: dict, *, threads: int | None = None, device: str | None = None):
    """The embedder's session for its backend (each imported only when one is opened)."""
    backend = (manifest.get("backend") or {}).get("name")
    if backend == "tvm":
        from .tvm_embedding import TVMEmbedding
        return TVMEmbedding(folder, manifest, threads=threads, device=device)
    return OnnxRuntimeEmbedding(folder, manifest, threads=threads, device=device)


class EmbeddingSession:
    """The manifest's ``embedding`` entry, checked, and batches of ids in, vectors out; a
    backend's subclass computes the graph (:meth:`_compute`)."""

    def __init__(self, folder, manifest: dict):
        where = Path(folder) / "manifest.json"
        spec, backend = manifest.get("embedding"), manifest.get("backend")
        try:
            self.dimension = _count(spec["dimension"], "dimension")
            self.max_length = _count(spec["max_seq_length"], "max_seq_length")
            self.token_types = spec["token_types"] is True
            self.pooling = [str(p) for p in spec["pooling"]]
            self.normalize = spec["normalize"] is True
            self.backend = dict(backend)
        except (KeyError, TypeError, IndexError, ValueError) as e:
            what = f"has no {e.args[0]!r}" if isinstance(e, KeyError) else f"has a bad value ({e})"
            raise ArtifactError(where, f"the manifest's embedding entry {what}") from None
        config = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
        self.vocab_size = config.get("vocab_size") if isinstance(config.get("vocab_size"), int) else None
        pad = config.get("pad_token_id")
        self.pad_id = pad if isinstance(pad, int) and not isinstance(pad, bool) and pad >= 0 else 0

    def run(self, rows: list[list[int]]) -> np.ndarray:
        """float32 [len(rows), dimension]: one batch, right-padded to its longest row."""
        n = max(len(r) for r in rows)
        ids = np.full((len(rows), n), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), n), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
            mask[i, :len(r)] = 1
        feeds = {"input_ids": ids, "attention_mask": mask}
        if self.token_types:
            feeds["token_type_ids"] = np.zeros_like(ids)       # one segment per input
        out = np.asarray(self._compute(feeds), dtype=np.float32)
        if out.shape != (len(rows), self.dimension):
            raise ArtifactError(None, f"the embedding model returned shape {list(out.shape)}, its manifest "
                                      f"says [{len(rows)}, {self.dimension}]")
        return out

    def _compute(self, feeds: dict) -> np.ndarray:
        raise NotImplementedError

    # The server's scheduler is built over every artifact's session; over an embedder's it
    # only idles (the completion endpoints refuse embedders before they reach it).
    def start_rows(self, n: int) -> None:
        pass


class OnnxRuntimeEmbedding(EmbeddingSession):
    def __init__(self, folder, manifest: dict, *, threads: int | None = None, device: str | None = None):
        import onnxruntime as ort

        from .onnx_check import check_external_data
        from .onnxrt_session import _providers
        super().__init__(folder, manifest)
        try:
            model_path = Path(folder) / self.backend["model"]
            self.output = str(self.backend["outputs"][0])
        except (KeyError, TypeError, IndexError) as e:
            raise ArtifactError(Path(folder) / "manifest.json",
                                f"the manifest's onnxrt backend entry has no usable {e.args[0]!r}") from None
        check_external_data(model_path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or os.cpu_count() or 1
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self.sess = ort.InferenceSession(os.fspath(model_path), opts, providers=_providers(
                device or manifest.get("target", {}).get("device"), folder))
        except Exception as e:                 # ORT's own exception types are not RuntimeErrors
            if type(e).__module__.split(".")[0] != "onnxruntime":
                raise
            reason = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", str(e).strip()).splitlines()[0][:400]
            raise ArtifactError(model_path, f"ONNX Runtime cannot load the model: {reason}") from None

    def _compute(self, feeds: dict) -> np.ndarray:
        return self.sess.run([self.output], feeds)[0]


class TooLong(ValueError):
    """An input past the model's max_seq_length (the server answers it with 413)."""


def _count(v, key: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{key} {v!r} is not a positive whole number")
    return v


def is_token_ids(x) -> bool:
    return isinstance(x, (list, tuple)) and all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in x)


def as_batch(inputs) -> list:
    """One input or a list of them (texts or token-id lists) as a list of inputs."""
    if isinstance(inputs, str) or (is_token_ids(inputs) and len(inputs) and not isinstance(inputs, np.ndarray)):
        return [inputs]
    if isinstance(inputs, np.ndarray):
        inputs = inputs.tolist() if inputs.ndim == 2 else [inputs.tolist()]
    if not isinstance(inputs, (list, tuple)):
        raise ValueError(f"embed takes a text, token ids, or a list of them, not {type(inputs).__name__}")
    return list(inputs)


def text_encoder(tokenizer):
    """text -> ids with the tokenizer's own special tokens, ignoring any padding or
    truncation its tokenizer.json asks for (lengths are checked here, padding is the batch's)."""
    if tokenizer is None:
        return None
    tok = tokenizer.backend
    if tok.padding is not None or tok.truncation is not None:
        from tokenizers import Tokenizer
        tok = Tokenizer.from_str(tok.to_str())
        tok.no_padding()
        tok.no_truncation()
    return lambda text: tok.encode(text, add_special_tokens=True).ids


def token_rows(session: EmbeddingSession, encode, inputs, *, truncate: bool = False) -> list[list[int]]:
    """Every input as checked token ids: texts tokenized, none empty, ids in the vocabulary,
    at most ``max_length`` tokens (longer ones cut there with ``truncate``, else refused)."""
    rows = []
    for i, x in enumerate(as_batch(inputs)):
        if isinstance(x, str):
            if encode is None:
                raise ValueError("the artifact has no tokenizer, so inputs must be token ids")
            ids = encode(x)
        elif is_token_ids(x):
            ids = [int(t) for t in x]
            bad = next((t for t in ids if t < 0 or (session.vocab_size is not None and t >= session.vocab_size)), None)
            if bad is not None:
                raise ValueError(f"input {i}: token id {bad} is outside the vocabulary (0..{session.vocab_size - 1})"
                                 if session.vocab_size else f"input {i}: token id {bad} is negative")
        else:
            raise ValueError(f"input {i} is neither a text nor a list of token ids")
        if not ids:
            raise ValueError(f"input {i} is empty (no tokens)")
        if len(ids) > session.max_length:
            if not truncate:
                raise TooLong(f"input {i} has {len(ids)} tokens; the model takes at most {session.max_length}")
            ids = ids[:session.max_length]
        rows.append(ids)
    if not rows:
        raise ValueError("no inputs to embed")
    return rows


def embed_rows(session: EmbeddingSession, rows: list[list[int]], batch_size: int = BATCH) -> np.ndarray:
    """float32 [len(rows), dimension], in the order of ``rows``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out = np.empty((len(rows), session.dimension), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        part = order[start:start + batch_size]
        out[part] = session.run([rows[i] for i in part])
    return out
