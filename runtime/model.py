"""A loaded artifact: the user-facing model with logits, generate, stream, chat and perplexity."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from kiln.artifact import ArtifactError, open_checked

from . import generation
from .heap import keep_freed_buffers, release_free_heap
from .tokenizer import Tokenizer


class Model:
    #: an embedding model's pooling and normalizing (the manifest's ``embedding``); None: a language model
    embedding: dict | None = None

    def __init__(self, folder, *, threads: int | None = None, device: str | None = None, verify: bool = False,
                 trusted_keys=None):
        self.path = Path(folder)
        # before any backend reads a byte: the listing, the sizes, the sha256 of the library and
        # of every parsed file (all of them with verify or keys), the signature when keys are given
        self.manifest = open_checked(self.path, verify=verify, trusted_keys=trusted_keys)
        self.config = self.manifest.get("config", {})
        if not isinstance(self.config, dict):
            raise ArtifactError(self.path / "manifest.json", "the manifest's config is not an object")
        backend = self.manifest["backend"]["name"]
        # each backend's session is imported only when one of its artifacts is opened, so
        # ONNX Runtime artifacts never pay for importing TVM
        if backend == "onnxrt":
            from .onnxrt_session import OnnxRuntimeSession as session_type
        elif backend == "tvm":
            from .tvm_session import TVMSession as session_type
        else:
            raise ArtifactError(self.path / "manifest.json", f"names backend {backend!r}, which this runtime does not have")
        #: An embedding model's pooling (the manifest's ``embedding`` entry), else None: see :meth:`embed`
        self.embedding = self.manifest.get("embedding")
        self._encode_text = None        # text -> ids for embed, made when first needed
        if self.embedding is not None:
            from .embedding import open_session as session_type
        # the tokenizer first: parsing its JSON briefly takes some 40 MB, which is then given
        # back, so the process's peak memory is not that on top of the weights
        tok_dir = self.path / "tokenizer"
        self.tokenizer = Tokenizer.load(tok_dir) if tok_dir.is_dir() else None
        release_free_heap()
        keep_freed_buffers()        # every token's vocabulary-sized temporaries
        self.session = session_type(self.path, self.manifest, threads=threads, device=device)
        gen = self.manifest.get("generation") or {}
        eos = gen.get("eos_token_id", self.config.get("eos_token_ids", []))
        #: End-of-sequence ids; the tokenizer's when there is one, else the model's own.
        self.eos_ids = list(self.tokenizer.eos_ids) if self.tokenizer is not None and self.tokenizer.eos_ids \
            else self._manifest_eos(eos)

    def _manifest_eos(self, eos) -> list[int]:
        ids = [eos] if isinstance(eos, int) else eos if isinstance(eos, list) else [] if eos is None else None
        if ids is None or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 1 << 31 for i in ids):
            raise ArtifactError(self.path / "manifest.json", "the manifest's eos_token_id is not a token id or a list of them")
        return list(ids)

    # ---- embeddings ---------------------------------------------------------------------
    def embed(self, inputs, *, batch_size: int = 32, truncate: bool = False) -> np.ndarray:
        """float32 [n, dimension]: one vector per input (a text, a list of token ids, or a list
        of either), pooled and normalized as the model's sentence-transformers modules say.
        Texts get the tokenizer's special tokens; ids are taken as given. An input longer than
        the model's ``max_seq_length`` is refused, or cut there with ``truncate``."""
        from . import embedding
        return embedding.embed_rows(self.session, self.embedding_tokens(inputs, truncate=truncate), batch_size)

    def embedding_tokens(self, inputs, *, truncate: bool = False) -> list[list[int]]:
        """The token ids :meth:`embed` computes each input's vector from (checked; texts
        tokenized with the tokenizer's special tokens): what usage counts."""
        from . import embedding
        if self.embedding is None:
            raise ValueError(f"{self.path}: not an embedding model (compile a sentence-transformers folder "
                             "to get one)")
        if self._encode_text is None:
            self._encode_text = embedding.text_encoder(self.tokenizer)
        return embedding.token_rows(self.session, self._encode_text, inputs, truncate=truncate)

    def _decoder(self) -> None:
        if self.embedding is not None:
            raise ValueError(f"{self.path}: an embedding model computes vectors, not text (use Model.embed, "
                             "kiln embed or POST /v1/embeddings)")

    # ---- scoring ------------------------------------------------------------------------
    def logits(self, ids) -> np.ndarray:
        """float32 [batch, seq, vocab] for a batch of equal-length id sequences (fresh cache)."""
        self._decoder()
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None, :]
        self.session.reset(ids.shape[0])
        return np.asarray(self.session.forward(ids), dtype=np.float32)

    def perplexity(self, text_or_ids, *, window: int | None = None, stride: int | None = None) -> float:
        """exp(mean negative log-likelihood) of every token after the first; see :meth:`evaluate`."""
        return self.evaluate(text_or_ids, window=window, stride=stride)["perplexity"]

    def evaluate(self, text_or_ids, *, window: int | None = None, stride: int | None = None,
                 chunk: int = 256) -> dict:
        """Perplexity with a sliding window, as transformers' guide computes it.

        A text longer than ``window`` tokens (default: the model's context) is scored in
        windows that start ``stride`` tokens apart (default: half a window); each token is
        scored once, in the first window that holds it, with everything before it in that
        window as context. Each window runs through the KV cache ``chunk`` tokens at a time,
        so memory holds one chunk's logits, not the whole text's.
        Returns perplexity, the tokens scored, seconds and tokens per second.
        """
        import time
        self._decoder()
        ids = self._ids(text_or_ids)
        if len(ids) < 2:
            raise ValueError("perplexity needs at least two tokens")
        limit = self.session.max_length or len(ids)
        window = min(window or limit, limit)
        if window < 2:
            raise ValueError(f"window must be at least 2 tokens, got {window}")
        stride = stride or max(window // 2, 1)
        if not 1 <= stride <= window:
            raise ValueError(f"stride must be between 1 and the window ({window}), got {stride}")
        start = time.perf_counter()
        nll, scored, done = 0.0, 0, 1          # tokens before index `done` are already scored
        begin = 0
        while done < len(ids):
            end = min(begin + window, len(ids))
            self.session.reset(1)
            for c in range(begin, end, chunk):
                part = ids[c:min(c + chunk, end)]
                logits = np.asarray(self.session.forward(np.asarray([part], dtype=np.int64)))[0]
                # the logits at position p predict token p + 1: score those not scored before
                targets = np.arange(c + 1, c + 1 + len(part))
                keep = (targets < end) & (targets >= done)
                if keep.any():
                    rows = logits[keep].astype(np.float64)
                    m = rows.max(-1, keepdims=True)
                    logp = rows - m - np.log(np.exp(rows - m).sum(-1, keepdims=True))
                    nll -= logp[np.arange(len(rows)), np.asarray(ids)[targets[keep]]].sum()
                    scored += int(keep.sum())
            done = end
            begin += stride
        seconds = time.perf_counter() - start
        return {"perplexity": float(np.exp(nll / scored)), "tokens": scored, "seconds": seconds,
                "tokens_per_s": len(ids) / seconds if seconds else float("inf"), "window": window,
                "stride": stride}

    # ---- generation ---------------------------------------------------------------------
    # A prompt is text or token ids; ids work whether or not the artifact has a tokenizer, and
    # without one the results carry ids and an empty text.
    # The settings: ``params=SamplingParams(...)`` and/or keyword arguments by its field names
    # (``max_new_tokens`` for ``max_tokens``), which override ``params``.
    def generate(self, prompt, max_new_tokens: int | None = None, *, num_beams: int = 1, length_penalty: float = 1.0,
                 early_stopping: bool | str = False, num_return_sequences: int = 1, **kwargs):
        """Greedy or sampled completion; with ``num_beams`` > 1 (or ``num_return_sequences`` > 1)
        beam search as transformers' ``generate(num_beams=...)``: see :mod:`kiln.runtime.beam`,
        whose results carry a ``score`` and come best first in a list when
        ``num_return_sequences`` > 1. ``draft=`` (a Model or an artifact's path) and
        ``draft_tokens=``: speculative decoding, see :mod:`kiln.runtime.speculative`."""
        kwargs = self._settings(kwargs, max_new_tokens)
        if num_beams != 1 or num_return_sequences != 1:
            if kwargs.get("draft") is not None:
                raise ValueError("beam search takes no draft model; speculative decoding is for greedy and "
                                 "sampled decoding")
            kwargs.pop("draft", None)
            kwargs.pop("draft_tokens", None)
            from . import beam
            return beam.generate(self.session, self.tokenizer, prompt, num_beams=num_beams,
                                 length_penalty=length_penalty, early_stopping=early_stopping,
                                 num_return_sequences=num_return_sequences, **kwargs)
        return generation.generate(self.session, self.tokenizer, prompt, **kwargs)

    def stream(self, prompt, max_new_tokens: int | None = None, **kwargs):
        return generation.stream(self.session, self.tokenizer, prompt, **self._settings(kwargs, max_new_tokens))

    def _settings(self, kwargs: dict, max_new_tokens: int | None) -> dict:
        self._decoder()
        kwargs.setdefault("eos_ids", self.eos_ids)
        if kwargs.get("draft") is not None:
            kwargs["draft"] = self.draft_session(kwargs["draft"])
        if max_new_tokens is not None:
            kwargs["max_new_tokens"] = max_new_tokens
        return kwargs

    def draft_session(self, draft):
        """The session of a draft model (a Model, or an artifact's path, loaded once) whose
        vocabulary is this model's."""
        from .speculative import check_same_vocabulary
        loaded, checked = self.__dict__.setdefault("_drafts", ({}, []))     # by path; the Models checked
        if not isinstance(draft, Model):
            if str(draft) not in loaded:
                from . import load          # as the target: $KILN_TRUSTED_KEYS applies
                loaded[str(draft)] = load(draft)
            draft = loaded[str(draft)]
        if draft is self or draft.session is self.session:
            raise ValueError("the draft must be another model than the target (load the artifact twice to "
                             "draft with the model itself)")
        if not any(d is draft for d in checked):
            check_same_vocabulary(self.tokenizer, draft.tokenizer, draft.path)
            checked.append(draft)
        return draft.session

    def chat_prompt(self, messages, add_generation_prompt: bool = True, tools: list | None = None) -> str:
        """The chat template's text of ``messages``; ``tools`` (``[{"type": "function",
        "function": {...}}]``) are passed to it as transformers' ``apply_chat_template`` does."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        return self._tok().apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools)

    def chat(self, messages, max_new_tokens: int | None = None, stream: bool = False, **kwargs):
        """Answer a conversation: a list of ``{"role", "content"}`` messages rendered by the
        model's chat template, a single user message as a string, or token ids of a
        conversation already rendered (which need no tokenizer). At most 256 new tokens unless
        ``max_new_tokens`` or ``params`` says otherwise."""
        if max_new_tokens is None and kwargs.get("params") is None and "max_tokens" not in kwargs:
            max_new_tokens = 256
        prompt = list(messages) if generation.is_id_list(messages) else self.chat_prompt(messages)
        fn = self.stream if stream else self.generate
        return fn(prompt, max_new_tokens=max_new_tokens, **kwargs)

    def _ids(self, text_or_ids) -> list[int]:
        if isinstance(text_or_ids, str):
            return self._tok().encode(text_or_ids)
        return [int(x) for x in text_or_ids]

    def _tok(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(f"{self.path}: the artifact has no tokenizer, so text needs token "
                             "ids in its place")
        return self.tokenizer
