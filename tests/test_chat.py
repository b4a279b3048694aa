"""`ctcspec chat` driven through a pipe: each line answered (greedy, HF generate's answer to the conversation so
far through the chat template), /stats, /reset, and a clean exit at the end of input."""

from __future__ import annotations

import contextlib
import os
import pty
import select
import subprocess
import sys
import time

from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import hf_greedy
from ctcspec.prompts import encode_chat

TOKENS = 12


def test_chat_through_a_pipe(tiny_model_dir):
    first, second = "w5 w6 w7 w5 w6", "w30 w31"
    lines = [first, "/stats", second, "/reset", first, "/nonsense", ""]
    result = subprocess.run([sys.executable, "-m", "ctcspec", "chat", "--model", str(tiny_model_dir),
                             "--max-new-tokens", str(TOKENS)], input="\n".join(lines) + "\n", capture_output=True,
                            text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    answers = result.stdout.splitlines()

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    def oracle(messages):
        ids = hf_greedy(model, encode_chat(tokenizer, messages), TOKENS)
        return tokenizer.decode(ids, skip_special_tokens=True)

    one = oracle([{"role": "user", "content": first}])
    two = oracle([{"role": "user", "content": first}, {"role": "assistant", "content": one},
                  {"role": "user", "content": second}])
    assert answers == [one, two, one]  # the second turn sees the first; after /reset the conversation is new
    assert f"{TOKENS} tokens" in result.stderr and "beta" in result.stderr
    assert "conversation cleared" in result.stderr and "unknown command /nonsense" in result.stderr


def test_ctrl_c_stops_an_answer_without_quitting(tiny_model_dir):
    """At a terminal (a pseudo-terminal here), Ctrl-C during an answer stops it and the prompt comes back."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: ctcspec chat on the terminal
        os.environ["OMP_NUM_THREADS"] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "ctcspec", "chat", "--model", str(tiny_model_dir),
                                  "--max-new-tokens", "300", "--backend", "hf"])
    seen, shown = "", []

    def read_until(text: str, timeout: float = 120) -> None:
        """Read the terminal until `text` appears in what has not been matched yet."""
        nonlocal seen
        deadline = time.monotonic() + timeout
        while text not in seen:
            assert time.monotonic() < deadline, f"{text!r} never came; the terminal shows:\n{seen}"
            if select.select([fd], [], [], 0.5)[0]:
                seen += os.read(fd, 4096).decode(errors="replace")
        seen = seen[seen.index(text) + len(text):]
        shown.append(text)

    try:
        read_until("> ")
        os.write(fd, b"w5 w6 w7\n")
        read_until("w5 w6 w7\r\n")           # the terminal's echo of the line
        read_until(" w", timeout=60)        # the answer has begun
        os.write(fd, b"\x03")               # Ctrl-C
        read_until("[answer stopped]")
        os.write(fd, b"/stats\n")
        read_until("no answer yet")          # the stopped answer left no figures
        os.write(fd, b"/quit\n")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, seen
        assert "Traceback" not in seen, shown
    finally:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, 9)
            os.waitpid(pid, 0)
