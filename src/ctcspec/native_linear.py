"""ctcspec's own fp32 linear kernel for AVX-512 CPUs, compiled on the machine that runs it (`--kernels native`).

A one-token forward streams every weight once, so its products can run no faster than memory
bandwidth; torch's stock fp32 path reached about half of it on the AMD EPYC kind of this project's
machines (docs/kernels.md). `csrc/linear_f32.cpp` reads a copy of each weight packed so that one pass
over four output rows is one sequential stream, which the hardware prefetcher follows at close to the
bandwidth, and shares each pass among up to four rows of input, so a tree of a few nodes costs little
more than one token.

Its invariant (stated in the source and tested): each output is reduced in an order fixed by the input
width alone, so a row of a tree verification is bit for bit the one-row product of the same input. The
arithmetic is fp32 with fp32 accumulation, like every other kernel choice; only the summation order differs
from torch's, and decoding is tested token-identical to HF `generate` on the stock model.

The library is built once per source, compiler flags and CPU (a second or two with the system's C++
compiler) under $CTCSPEC_HOME/kernels, and loaded with ctypes; `native_problem()` says why it cannot be used
on a machine (no AVX-512, no compiler, a failed build), and `--kernels auto` then measures the others only.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ctcspec.home import ctcspec_home

SOURCE = Path(__file__).with_name("csrc") / "linear_f32.cpp"
# No fast-math and no FMA contraction: the kernel's summation order is the one its source writes.
COMPILE_FLAGS = ("-O3", "-march=native", "-fno-fast-math", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC",
                 "-std=c++17")
REQUIRED_CPU_FLAGS = ("avx512f",)


def cpu_description() -> dict[str, str]:
    """The CPU this process runs on: its model name and the feature flags the kernels may use (Linux)."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "flags") and key not in fields:
                fields[key] = value.strip()
    except OSError:
        pass
    flags = sorted(f for f in fields.get("flags", "").split() if f.startswith(("avx", "amx", "fma")))
    return {"model": fields.get("model name", platform.processor() or platform.machine()), "flags": " ".join(flags)}


def _compiler() -> list[str] | None:
    if os.environ.get("CXX"):
        return shlex.split(os.environ["CXX"])
    found = shutil.which("c++") or shutil.which("g++")
    return [found] if found else None


@functools.cache
def native_problem() -> str | None:
    """Why the native kernel cannot run on this machine, or None when it can (building it if need be)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"it needs an x86-64 CPU (this is {platform.machine()})"
    flags = cpu_description()["flags"].split()
    missing = [f for f in REQUIRED_CPU_FLAGS if f not in flags]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    try:
        _library()
    except (OSError, RuntimeError) as exc:
        return str(exc)
    return None


def source_digest() -> str:
    """What identifies the kernel's code: caches of its timings are keyed by it."""
    return hashlib.sha256(SOURCE.read_bytes() + " ".join(COMPILE_FLAGS).encode()).hexdigest()[:16]


def _library_path(compiler: list[str]) -> Path:
    key = hashlib.sha256("\0".join([source_digest(), *compiler, repr(sorted(cpu_description().items()))]).encode())
    key = key.hexdigest()[:16]
    return ctcspec_home() / "kernels" / key / "linear_f32.so"


@functools.cache
def _library() -> ctypes.CDLL:
    """Build (once per source, compiler, flags and CPU) and load the kernel library."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (install g++, or set CXX)")
    path = _library_path(compiler)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as staging:
            built = Path(staging) / path.name
            try:
                result = subprocess.run([*compiler, *COMPILE_FLAGS, str(SOURCE), "-o", str(built)],
                                        capture_output=True, text=True, timeout=300)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"building {SOURCE.name} with {compiler[0]} took over 300 s") from None
            if result.returncode != 0:
                lines = result.stderr.strip().splitlines() or ["no output"]
                first = next((line for line in lines if "error" in line), lines[0])
                raise RuntimeError(f"building {SOURCE.name} with {compiler[0]} failed: {first}")
            os.replace(built, path)  # atomic: processes building side by side never load half a file
    library = ctypes.CDLL(str(path))
    library.ctcspec_linear_f32.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p,
                                           ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    library.ctcspec_linear_f32.restype = None
    return library


BLOCK_ROWS, LANES = 4, 16  # the packed layout of csrc/linear_f32.cpp
NATIVE_ROWS = 4  # rows served by one pass over the weights (kRowTile there); more take another pass


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """The kernel's layout of an (out, in) weight: packed[b, j, i, l] = weight[4b + i, 16j + l], zero past it."""
    out, width = weight.shape
    blocks, chunks = -(-out // BLOCK_ROWS), -(-width // LANES)
    padded = F.pad(weight.detach().float(), (0, chunks * LANES - width, 0, blocks * BLOCK_ROWS - out))
    return padded.view(blocks, BLOCK_ROWS, chunks, LANES).permute(0, 2, 1, 3).contiguous()


def native_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` on the native kernel, `packed` = pack_weight(weight); fp32 CPU tensors."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.empty(*x.shape[:-1], out_features, dtype=torch.float32)
    _library().ctcspec_linear_f32(rows.data_ptr(), rows.shape[0], rows.shape[1], packed.data_ptr(), out_features,
                                  None if bias is None else bias.data_ptr(), out.data_ptr(), torch.get_num_threads())
    return out


class NativeLinear(nn.Linear):
    """An `nn.Linear` whose inference forward runs the native kernel on a packed copy of its (frozen) weight;
    with gradients wanted it is the stock layer."""

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> NativeLinear:
        """Parameters stay parameters and buffers stay plain tensors: both are shared, not copied."""
        native = cls.__new__(cls)
        nn.Module.__init__(native)
        native.out_features, native.in_features = weight.shape
        native.weight, native.bias = weight, bias
        with torch.no_grad():
            native.native_weight = pack_weight(weight)
            native.native_bias = None if bias is None else bias.detach().float().contiguous()
        return native

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)) or x.dtype != torch.float32 \
                or x.device.type != "cpu" or x.shape[-1] != self.in_features:
            return super().forward(x)  # gradients, or an input the kernel does not take: the stock layer decides
        return native_linear(x, self.native_weight, self.out_features, self.native_bias)
