"""The deployment-side tokenizer: encode, decode, stream-decode and chat templates.

Reads the files ``kiln.frontends.tokenizer.TokenizerSpec.save`` writes (tokenizer.json and
tokenizer_config.json) and also plain Hugging Face tokenizer folders. Depends only on
``tokenizers``, ``jinja2`` and the standard library -- never on kiln's frontends or compiler.

Chat templates render the way ``transformers`` renders them: a sandboxed, immutable Jinja
environment with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, a
``{% generation %}`` block tag, ``raise_exception``, ``strftime_now`` and a ``tojson`` filter
that keeps non-ASCII text, and the special tokens (``bos_token``, ``eos_token``, ...) as variables.
"""
from __future__ import annotations

import functools
import json
import os
from datetime import datetime

import tokenizers

__all__ = ["Tokenizer", "StreamDecoder", "ChatTemplateError"]


class ChatTemplateError(ValueError):
    """No chat template, a template that does not compile, or one that raised an error."""


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _token_text(v):
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def pick_template(v):
    """chat_template may be a string or a list of {"name", "template"}; take the default one."""
    if isinstance(v, list):
        named = {d.get("name"): d.get("template") for d in v if isinstance(d, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return v if isinstance(v, str) else None


def read_chat_template(folder, config: dict):
    """A folder's chat template: chat_template.jinja, else tokenizer_config.json's entry.
    Shared with the conversion side (kiln.frontends.tokenizer), which reads the same files."""
    jinja_path = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return f.read()
    return pick_template(config.get("chat_template"))


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus special ids, BOS/EOS policy and the chat template."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, *, bos_id=None, eos_ids=(), pad_id=None,
                 unk_id=None, add_bos=False, add_eos=False, chat_template=None):
        self._tok = tokenizer
        self._bos_id = bos_id
        self._eos_ids = [int(i) for i in eos_ids]
        self._pad_id = pad_id
        self._unk_id = unk_id
        self.add_bos = bool(add_bos) and bos_id is not None
        self.add_eos = bool(add_eos) and bool(self._eos_ids)
        self.chat_template = chat_template
        self._vocab_size = None

    # -- loading ------------------------------------------------------------------------------

    @classmethod
    def load(cls, folder) -> "Tokenizer":
        """Load tokenizer.json + tokenizer_config.json (and, when present, chat_template.jinja,
        special_tokens_map.json and generation_config.json) from ``folder``."""
        folder = os.fspath(folder)
        tj_path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(tj_path):
            raise FileNotFoundError(f"{folder}: no tokenizer.json")
        try:
            tok = tokenizers.Tokenizer.from_file(tj_path)
        except Exception as e:  # tokenizers raises a bare Exception
            raise ValueError(f"{tj_path}: cannot load ({str(e).splitlines()[0]})") from None

        def opt(name):
            p = os.path.join(folder, name)
            return _read_json(p) if os.path.isfile(p) else {}

        cfg, stm, gen = opt("tokenizer_config.json"), opt("special_tokens_map.json"), opt("generation_config.json")

        def tid(key):
            text = _token_text(cfg.get(key)) or _token_text(stm.get(key))
            return None if text is None else tok.token_to_id(text)

        bos, eos = tid("bos_token"), tid("eos_token")
        if bos is None and isinstance(gen.get("bos_token_id"), int):
            bos = gen["bos_token_id"]
        eos_ids = [eos] if eos is not None else []
        for src in (cfg.get("eos_token_ids"), gen.get("eos_token_id")):
            for i in src if isinstance(src, list) else [src]:
                if isinstance(i, int) and i not in eos_ids:
                    eos_ids.append(i)

        template = read_chat_template(folder, cfg)

        add_bos, add_eos = cfg.get("add_bos_token"), cfg.get("add_eos_token")
        if add_bos is None or add_eos is None:
            pp_bos, pp_eos = cls._post_processor_flags(tok, bos, eos_ids[0] if eos_ids else None)
            add_bos = pp_bos if add_bos is None else add_bos
            add_eos = pp_eos if add_eos is None else add_eos
        return cls(tok, bos_id=bos, eos_ids=eos_ids, pad_id=tid("pad_token"), unk_id=tid("unk_token"),
                   add_bos=add_bos, add_eos=add_eos, chat_template=template)

    @staticmethod
    def _post_processor_flags(tok, bos, eos):
        """Whether tokenizer.json's own post-processor adds BOS / EOS (for folders without flags)."""
        probe = tok.encode("a", add_special_tokens=True).ids
        bare = tok.encode("a", add_special_tokens=False).ids
        if probe == bare:
            return False, False
        return (bos is not None and probe[:1] == [bos] and bare[:1] != [bos],
                eos is not None and probe[-1:] == [eos] and bare[-1:] != [eos])

    # -- properties ---------------------------------------------------------------------------

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_ids(self) -> list:
        return list(self._eos_ids)

    @property
    def eos_id(self) -> int | None:
        return self._eos_ids[0] if self._eos_ids else None

    @property
    def pad_id(self) -> int | None:
        return self._pad_id

    @property
    def vocab_size(self) -> int:
        """One more than the largest token id (model vocabulary and added tokens). Computed when
        first asked for: the vocabulary as a Python dict is ~10 MB that loading need not hold."""
        if self._vocab_size is None:
            vocab = self._tok.get_vocab(with_added_tokens=True)
            self._vocab_size = max(vocab.values()) + 1 if vocab else 0
        return self._vocab_size

    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._tok

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))

    def _text(self, i):
        return None if i is None else self._tok.id_to_token(i)

    @property
    def special_tokens(self) -> dict:
        """The special tokens as text, as chat templates see them."""
        out = {}
        for name, i in (("bos_token", self._bos_id), ("eos_token", self.eos_id),
                        ("unk_token", self._unk_id), ("pad_token", self._pad_id)):
            t = self._text(i)
            if t is not None:
                out[name] = t
        return out

    # -- encode / decode ----------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list:
        """Token ids of ``text``. Special-token text such as ``<|im_start|>`` becomes its id.
        With ``add_special_tokens``, BOS (and EOS) are added when the tokenizer asks for them."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self.add_bos:
                ids = [self._bos_id] + ids
            if self.add_eos:
                ids = ids + [self.eos_id]
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    # -- chat ---------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list, add_generation_prompt: bool = True, *,
                            chat_template: str | None = None, tools=None, documents=None,
                            **kwargs) -> str:
        """Render ``messages`` (dicts with ``role`` and ``content``) with the chat template."""
        template = chat_template if chat_template is not None else self.chat_template
        if template is None:
            raise ChatTemplateError("this tokenizer has no chat template; pass chat_template= "
                                    "or format the prompt yourself")
        compiled = _compile_template(template)
        variables = dict(self.special_tokens)
        variables.update(kwargs)
        import jinja2
        try:
            return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   tools=tools, documents=documents, **variables)
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template failed: {e}") from None


class StreamDecoder:
    """Turns token ids, one at a time, into text as soon as it is complete.

    ``put(id)`` returns only the newly completed text ("" while a multi-byte character is still
    split across byte-level tokens); ``flush()`` returns whatever is left at the end. It decodes
    a small window of recent ids, so word-boundary rules of the decoder (SentencePiece's leading
    space) apply exactly as they do to the whole sequence.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tok = tokenizer.backend if isinstance(tokenizer, Tokenizer) else tokenizer
        self._skip = skip_special_tokens
        self._ids: list = []
        self._prefix = 0   # start of the window of already-emitted ids kept for context
        self._read = 0     # ids before this have been emitted

    def _decode(self, ids) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def put(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        done = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        if len(text) > len(done) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(done):]
        return ""

    __call__ = put

    def flush(self) -> str:
        """The text not yet returned (it may end in U+FFFD if the ids stopped mid-character)."""
        done = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return text[len(done):]

    def reset(self) -> None:
        self._ids, self._prefix, self._read = [], 0, 0


# -- Jinja ------------------------------------------------------------------------------------

def _raise_exception(message):
    raise ChatTemplateError(f"chat template raised: {message}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile_template(source: str):
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask marker):
        rendered as its body; kiln does not compute assistant masks."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not compile: {e.message} (line {e.lineno})") from None
