"""``kiln chat ARTIFACT``: a conversation with a compiled model in the terminal.

The REPL of ``ollama run`` / ``llama-cli -cnv`` / ``mlc_llm chat``, over the runtime's public
API only (``Model.chat_prompt`` and ``Model.stream``), so it works with every backend.

Decisions a user may want to know:

* Every answer is generated from the whole conversation so far, rendered by the model's chat
  template. Each turn prefills that conversation afresh: the runtime's ``stream`` starts from an
  empty KV cache, and reusing the cache across turns would need the scheduler's internals.
* Multi-line input: a line ending in ``\\`` continues on the next line, and a block between
  two ``\"\"\"`` lines (ollama's convention) is one message, blank lines included.
* Ctrl-C during an answer stops it and keeps what was printed as the model's turn (the
  conversation holds what the user saw); Ctrl-C at the prompt only clears the line. Ctrl-D or
  ``/bye`` quits.
* When the conversation no longer fits the context with room for ``max_tokens`` of answer, the
  oldest exchanges are dropped (the system message stays), and the REPL says so.
"""
from __future__ import annotations

import os
import sys
import time

from .stream_out import write_stream

HELP = """\
commands:
  /set temperature X    sampling temperature (0: greedy); also top_p, top_k, seed, max_tokens
  /set                  show the current settings
  /system TEXT          set the system message (/system alone shows it, /system - clears it)
  /reset                forget the conversation (the system message stays)
  /help                 this text
  /bye                  quit (also Ctrl-D)
multi-line input: end a line with \\ to continue it, or put the message between two \"\"\" lines.
Ctrl-C stops an answer; what was printed stays in the conversation."""

#: /set NAME: (the setting it changes, the type of its value)
SETTINGS = {"temperature": ("temperature", float), "temp": ("temperature", float),
            "top_p": ("top_p", float), "top_k": ("top_k", int), "min_p": ("min_p", float),
            "seed": ("seed", int), "max_tokens": ("max_tokens", int), "n": ("max_tokens", int),
            "repetition_penalty": ("repetition_penalty", float)}


def add_arguments(s) -> None:
    """``kiln chat``'s flags: the sampling flags of ``kiln run``, spelled the same."""
    s.add_argument("artifact")
    s.add_argument("--system", help="system message the conversation starts with")
    from kiln.cli_flags import draft_flags, sampling_flags, threads_flag
    sampling_flags(s, max_new_tokens=512, n_help="tokens per answer at most (/set max_tokens N changes it)",
                   c_help="tokens the conversation and the answer may hold together; older exchanges are "
                          "dropped past it (default: the artifact's context)")
    threads_flag(s)
    draft_flags(s)


class Conversation:
    """The system message and the exchanges so far, fitted into the model's context."""

    def __init__(self, model, system: str | None, ctx: int | None):
        self.model, self.system, self.ctx = model, system, ctx
        self.turns: list[tuple[str, str]] = []          # (user, assistant)

    def messages(self, question: str | None = None) -> list[dict]:
        out = [{"role": "system", "content": self.system}] if self.system else []
        for user, answer in self.turns:
            out += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        if question is not None:
            out.append({"role": "user", "content": question})
        return out

    def prompt_for(self, question: str, max_tokens: int) -> tuple[str, int, int]:
        """The rendered prompt for ``question``, the tokens the answer may take, and how many of
        the oldest exchanges were dropped to make room. A question that does not fit even alone
        raises ValueError (and the conversation is unchanged)."""
        dropped = 0
        while True:
            text = self.model.chat_prompt(self.messages(question))
            if self.ctx is None:
                return text, max_tokens, dropped
            used = len(self.model.tokenizer.encode(text))
            if used + max_tokens <= self.ctx or not self.turns:
                break
            self.turns.pop(0)
            dropped += 1
        if used >= self.ctx:
            raise ValueError(f"the message needs {used} tokens with the system message, more than the "
                             f"{self.ctx} the context holds; it was not sent")
        return text, min(max_tokens, self.ctx - used), dropped


class Repl:
    def __init__(self, model, a, out=sys.stdout, err=sys.stderr):
        self.model, self.out, self.err = model, out, err
        from kiln.runtime.context_size import checked
        limit = model.session.max_length
        ctx = checked(a.ctx_size, limit) if a.ctx_size is not None else limit
        self.chat = Conversation(model, a.system, ctx)
        self.settings = {"temperature": a.temperature, "top_p": a.top_p, "top_k": a.top_k,
                         "min_p": a.min_p, "repetition_penalty": a.repetition_penalty, "seed": a.seed,
                         "max_tokens": a.max_new_tokens}
        _sampler(self.settings)          # bad flags: one line before the first prompt
        # --draft: loaded and its vocabulary checked before the first prompt
        self.drafting = {}
        if getattr(a, "draft", None):
            from kiln import runtime
            draft = runtime.load(a.draft, threads=a.threads)
            model.draft_session(draft)
            self.drafting = dict(draft=draft, draft_tokens=a.draft_tokens)
        if a.max_new_tokens < 1:
            raise ValueError(f"-n/--max-new-tokens {a.max_new_tokens}: must be at least 1")
        # prompts are for a person typing; from a pipe, stdout holds the answers alone
        self.prompts = (">>> ", "... ") if sys.stdin.isatty() else ("", "")

    def say(self, text: str) -> None:
        print(text, file=self.err, flush=True)

    # ---- input -----------------------------------------------------------------------------
    def read_message(self) -> str | None:
        """One message (a command or a question), or None at end of input."""
        try:
            line = input(self.prompts[0])
        except EOFError:
            return None
        if line.strip().startswith('"""'):
            body = line.strip()[3:]
            return body[:-3] if body.endswith('"""') else self._read_block(body)
        lines = []
        while line.endswith("\\"):
            lines.append(line[:-1])
            try:
                line = input(self.prompts[1])
            except EOFError:
                break
        lines.append(line)
        return "\n".join(lines)

    def _read_block(self, first: str) -> str:
        lines = [first] if first else []
        while True:
            try:
                line = input(self.prompts[1])
            except EOFError:
                break
            if line.rstrip().endswith('"""'):
                if line.rstrip()[:-3]:
                    lines.append(line.rstrip()[:-3])
                break
            lines.append(line)
        return "\n".join(lines)

    # ---- commands --------------------------------------------------------------------------
    def command(self, line: str) -> bool:
        """Carry out a /command; False when it asks to quit."""
        name, _, rest = line[1:].partition(" ")
        rest = rest.strip()
        if name in ("bye", "exit", "quit"):
            return False
        if name in ("help", "?"):
            self.say(HELP)
        elif name in ("reset", "clear"):
            self.chat.turns.clear()
            self.say("(conversation cleared)")
        elif name == "system":
            if not rest:
                self.say(f"system message: {self.chat.system!r}" if self.chat.system else "(no system message)")
            else:
                self.chat.system = None if rest == "-" else rest
                self.say("(system message cleared)" if rest == "-" else "(system message set)")
        elif name == "set":
            self._set(rest)
        else:
            self.say(f"unknown command /{name}; /help lists the commands")
        return True

    def _set(self, rest: str) -> None:
        if not rest:
            self.say(", ".join(f"{k}={v}" for k, v in self.settings.items()))
            return
        key, _, value = rest.partition(" ")
        if key not in SETTINGS:
            self.say(f"unknown setting {key!r}; choose from temperature, top_p, top_k, min_p, "
                     f"repetition_penalty, seed, max_tokens")
            return
        field, kind = SETTINGS[key]
        value = value.strip()
        try:
            v = None if field == "seed" and value.lower() in ("none", "random") else kind(value)
        except ValueError:
            self.say(f"/set {key}: expected {'an integer' if kind is int else 'a number'}, got {value!r}")
            return
        new = {**self.settings, field: v}
        if new["max_tokens"] < 1:
            self.say("/set max_tokens: must be at least 1")
            return
        try:
            _sampler(new)                # the runtime's own checks, now rather than at the next question
        except ValueError as e:
            self.say(f"/set {key}: {e}")
            return
        self.settings = new
        self.say(f"(set {field} to {v})")

    # ---- answers ---------------------------------------------------------------------------
    def answer(self, question: str) -> None:
        s = self.settings
        try:
            prompt, room, dropped = self.chat.prompt_for(question, s["max_tokens"])
        except ValueError as e:
            self.say(f"kiln: {e}")
            return
        if dropped:
            self.say(f"(the conversation outgrew the context of {self.chat.ctx} tokens: dropped the "
                     f"oldest {dropped} exchange{'s' if dropped != 1 else ''})")
        pieces = self.model.stream(prompt, max_new_tokens=room, temperature=s["temperature"], top_k=s["top_k"],
                                   top_p=s["top_p"], min_p=s["min_p"], repetition_penalty=s["repetition_penalty"],
                                   seed=s["seed"], **self.drafting)
        shown, result, start = [], None, time.perf_counter()
        try:
            result = write_stream(pieces, self.out, shown)
        except KeyboardInterrupt:
            pieces.close()
            _forget_interrupt()
        self.out.write("\n")
        self.out.flush()
        self.chat.turns.append((question, "".join(shown)))
        if result is None:
            self.say(f"[stopped after {time.perf_counter() - start:.1f} s; the partial answer is kept]")
            return
        t = result.timings
        n = len(result.ids) + (result.finish_reason == "eos")
        self.say(f"[{n} tokens, {t.get('tokens_per_s', 0.0):.1f} tokens/s; prompt {result.prompt_tokens} "
                 f"tokens, {t.get('prefill_tokens_per_s', 0.0):.0f} tokens/s"
                 + ("; stopped at max_tokens" if result.finish_reason == "length" else "") + "]")

    def loop(self) -> int:
        while True:
            try:
                line = self.read_message()
            except KeyboardInterrupt:
                # at the prompt Ctrl-C drops the line being typed, as a shell does
                _forget_interrupt()
                self.out.write("\n")
                self.say("(Ctrl-D or /bye quits)")
                continue
            if line is None:
                if self.prompts[0]:
                    self.out.write("\n")            # leave the terminal's prompt on a line of its own
                return 0
            if not line.strip():
                continue
            if line.startswith("/") and "\n" not in line:
                if not self.command(line.strip()):
                    return 0
                continue
            try:
                self.answer(line)
            except KeyboardInterrupt:
                # between questions and the first token (rendering, tokenizing): nothing to keep
                _forget_interrupt()
                self.say("[stopped before the answer began]")


def _sampler(settings: dict):
    from kiln.runtime.sampling import Sampler
    return Sampler(settings["temperature"], settings["top_k"], settings["top_p"], settings["min_p"],
                   settings["repetition_penalty"], settings["seed"])


def _forget_interrupt() -> None:
    # the CLI remembers every Ctrl-C so that a native library's error after one reads as an
    # interrupt; a Ctrl-C the REPL has handled must not turn a later error into one
    from kiln import cli_checks
    cli_checks.interrupted.clear()


def _history_file() -> str:
    return os.path.join(os.path.expanduser("~"), ".kiln_chat_history")


def _start_history():
    """Line editing and history across sessions where Python has readline; the save function."""
    if not sys.stdin.isatty():
        return lambda: None
    try:
        import readline
    except ImportError:
        return lambda: None
    path = _history_file()
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(1000)

    def save():
        try:
            readline.write_history_file(path)
        except OSError:
            pass                        # a read-only home loses the history, not the chat
    return save


def run(model, a) -> int:
    """The REPL over a loaded model with ``kiln run``/``kiln chat``'s parsed flags."""
    if model.tokenizer is None:
        raise ValueError(f"{a.artifact}: the artifact has no tokenizer, so it cannot chat")
    model.chat_prompt([{"role": "user", "content": "hi"}])        # no template: one line, before the prompt
    repl = Repl(model, a)
    save = _start_history()
    if sys.stdin.isatty():
        repl.say("kiln chat: /help for commands, /bye or Ctrl-D to quit")
    try:
        return repl.loop()
    finally:
        save()


def main(a) -> int:
    from kiln import runtime
    return run(runtime.load(a.artifact, threads=a.threads), a)
