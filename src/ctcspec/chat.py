"""`ctcspec chat`: a conversation in the terminal on one speculative engine.

Each line is a user turn; the answer streams as the engine accepts tokens, and the conversation so far goes
through the model's chat template each turn. Commands: /reset (forget the conversation), /stats (beta and speed
of the last answer), /help, /quit. Ctrl-C stops an answer (what was written of it stays in the conversation)
without quitting; Ctrl-C or Ctrl-D at the prompt quits. With stdin not a terminal, every line is answered in turn
and the command ends at the end of input.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TextIO

from ctcspec.engine import GenerationStats, SpeculativeEngine
from ctcspec.errors import CtcspecError
from ctcspec.prompts import encode_chat
from ctcspec.text import ReleasedText

HELP = ("commands: /reset forgets the conversation, /stats shows the last answer's figures, /quit ends; "
        "Ctrl-C stops an answer")


@dataclass
class Conversation:
    engine: SpeculativeEngine
    tokenizer: object
    max_new_tokens: int
    settings: dict = field(default_factory=dict)
    system: str | None = None
    messages: list[dict] = field(default_factory=list)
    last: GenerationStats | None = None

    def reset(self) -> None:
        self.messages.clear()
        self.last = None

    def prompt_ids(self, text: str) -> list[int]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return encode_chat(self.tokenizer, [*system, *self.messages, {"role": "user", "content": text}])

    def answer(self, text: str, out: TextIO, seed: int | None = None) -> None:
        """Stream the answer to `text` into `out` and keep the turn; on Ctrl-C keep what was written, then re-raise."""
        released = ReleasedText(self.tokenizer)

        def write(tokens: list[int]) -> None:
            out.write(released.add(tokens))
            out.flush()

        prompt = self.prompt_ids(text)
        try:
            result = self.engine.generate(prompt, self.max_new_tokens, on_tokens=write, seed=seed, **self.settings)
        except KeyboardInterrupt:
            self._keep(text, released, out)
            raise
        self.last = result.stats
        self._keep(text, released, out)

    def _keep(self, text: str, released: ReleasedText, out: TextIO) -> None:
        out.write(released.finish() + "\n")
        out.flush()
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": released.text()}]


def describe(stats: GenerationStats | None, drafter: str) -> str:
    if stats is None:
        return "no answer yet"
    return (f"[{drafter}] {stats.new_tokens} tokens in {stats.steps} base forwards (beta {stats.beta:.2f}), "
            f"{stats.tokens_per_s:.1f} tok/s, drafting {stats.draft_s / (stats.decode_s or 1):.0%} of decoding; "
            f"stop: {stats.stop_reason}")


def read_line(lines: TextIO, interactive: bool) -> str:
    """The next line, "" at the end of input; at a terminal through input(), with line editing."""
    if not interactive:
        return lines.readline()
    with contextlib.suppress(ImportError):  # here only: importing it changes input() for the whole process
        import readline  # noqa: F401  (line editing and history, where the platform has it)
    try:
        return input("> ") + "\n"
    except EOFError:
        return ""


def run_chat(conversation: Conversation, lines: TextIO, out: TextIO, err: TextIO, interactive: bool,
             seed: int | None = None) -> int:
    """The chat loop over `lines`; returns the exit code."""
    drafter = conversation.engine.drafter.name
    if interactive:
        err.write(f"ctcspec chat ({drafter} drafter). {HELP}\n")
    while True:
        try:
            line = read_line(lines, interactive)
        except KeyboardInterrupt:
            err.write("\n")
            return 0
        if not line:
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return 0
        if text == "/reset":
            conversation.reset()
            err.write("conversation cleared\n")
        elif text == "/stats":
            err.write(describe(conversation.last, drafter) + "\n")
        elif text == "/help":
            err.write(HELP + "\n")
        elif text.startswith("/"):
            err.write(f"unknown command {text.split()[0]}; {HELP}\n")
        else:
            try:
                conversation.answer(text, out, seed=seed)
            except KeyboardInterrupt:
                err.write("[answer stopped]\n")
            except CtcspecError as exc:
                err.write(f"ctcspec: {exc} (/reset starts a new conversation)\n")
