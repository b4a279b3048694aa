"""The saved-drafter format: a directory with config.json + model.safetensors.

config.json records the module's kind and configuration, and the base model the drafter was trained
for (architecture, hidden size, vocabulary size and a fingerprint of its LM head), so loading it
against another base model is a clear error rather than garbage drafts. The base model's embedding
and LM head are not stored: they are taken from the base model at load time.
"""

from __future__ import annotations

import hashlib
import json
import math
from importlib import resources
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ctcspec.cpu_kernels import INSTALLED_KERNELS, install_draft_kernels, kernels_problem, linear_kernels_of
from ctcspec.errors import CtcspecError
from ctcspec.modules import KINDS, build_module, module_config, parameter_count
from ctcspec.modules.layers import base_head

FORMAT = "ctcspec-drafter"
FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
BASE_KEYS = ("architecture", "hidden_size", "vocab_size", "lm_head_sha256")
TRAINING_KEYS = ("steps", "planned_steps", "train_samples", "heldout_samples", "train_tokens", "train_seconds",
                 "device", "data")


ROUNDED_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}  # a base model may run in these too


def weight_fingerprint(weight: torch.Tensor, rounded_to: torch.dtype | None = None) -> str:
    """sha256 of a weight (as fp32, CPU), first rounded to `rounded_to` if given: identical only for the same
    weights."""
    weight = weight.detach()
    if rounded_to is not None:
        weight = weight.to(rounded_to)
    data = weight.to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def head_fingerprint(model: torch.nn.Module, rounded_to: torch.dtype | None = None) -> str:
    """The fingerprint of the model's LM head weights: identical only for the same base model weights."""
    return weight_fingerprint(base_head(model)[0], rounded_to)


def describe_base(model: torch.nn.Module) -> dict:
    config = model.config
    return {"architecture": (getattr(config, "architectures", None) or [type(model).__name__])[0],
            "model_type": config.model_type, "hidden_size": config.hidden_size,
            "vocab_size": base_head(model)[0].shape[0], "lm_head_sha256": head_fingerprint(model)}


def drafter_base(model: torch.nn.Module) -> dict:
    """What a saved drafter records of its base model: `describe_base`, and for an fp32 base its LM head's
    fingerprint rounded to each of ROUNDED_DTYPES, so the drafter serves the same model loaded in those too."""
    base = describe_base(model)
    if base_head(model)[0].dtype == torch.float32:
        base["lm_head_sha256_rounded"] = {name: head_fingerprint(model, rounded)
                                          for name, rounded in ROUNDED_DTYPES.items()}
    return base


def fingerprints(recorded: dict) -> set[str]:
    """The LM head fingerprints a recorded base description (`describe_base` or `drafter_base`) holds: two bases
    with one in common are the same weights, loaded in the same or (fp32 against bf16/fp16) another precision."""
    rounded = recorded.get("lm_head_sha256_rounded")
    return {recorded.get("lm_head_sha256"), *(rounded.values() if isinstance(rounded, dict) else ())} - {None}


def same_weights(recorded: dict, model: torch.nn.Module) -> bool:
    """Whether a recorded base description names this model's weights, in whatever precision either was loaded."""
    return bool(fingerprints(recorded) & fingerprints(drafter_base(model)))


def check_base(expected: dict, model: torch.nn.Module, where: str) -> None:
    actual = describe_base(model)
    dtype = str(base_head(model)[0].dtype).removeprefix("torch.")
    if expected.get("lm_head_sha256_rounded", {}).get(dtype) == actual["lm_head_sha256"]:
        actual["lm_head_sha256"] = expected["lm_head_sha256"]  # the drafter's fp32 base, loaded in this dtype
    for key in BASE_KEYS:
        if expected.get(key) != actual[key]:
            raise CtcspecError(
                f"drafter {where} was trained for another base model: its {key} is {expected.get(key)!r}, "
                f"this model's is {actual[key]!r}. Train a drafter for this model (ctcspec distill + ctcspec train).")


def save_drafter(directory: Path, module: torch.nn.Module, base: dict, extra: dict | None = None,
                 dtype: torch.dtype = torch.bfloat16) -> None:
    """Write config.json + model.safetensors (trained weights in `dtype`, plus the draft vocabulary)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().to("cpu", dtype).contiguous() for name, p in module.named_parameters()}
    tensors["vocab_ids"] = module.vocab_ids.to("cpu", torch.int64).contiguous()
    save_file(tensors, str(directory / WEIGHTS_FILE))
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": module.kind,
              "draft": module.config.to_dict(), "parameters": parameter_count(module), "base": base, **(extra or {})}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def read_config(directory: Path) -> dict:
    """A drafter's config.json, checked: the format, its version, a known kind, objects for `base` and `draft`,
    and readable acceptance curves."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not directory.is_dir():
        problem = "is a file, not a drafter directory" if directory.exists() else "does not exist"
        raise CtcspecError(f"drafter directory {str(directory)!r} {problem}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CtcspecError(f"drafter directory {str(directory)!r} has no {CONFIG_FILE}") from None
    except OSError as exc:
        raise CtcspecError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise CtcspecError(f"{path} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise CtcspecError(f"{path} is corrupt: not valid JSON ({exc.msg})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CtcspecError(f"{path} is not a ctcspec drafter config")
    if config.get("format_version") != FORMAT_VERSION:
        raise CtcspecError(f"{path} has format version {config.get('format_version')}; "
                           f"this ctcspec reads version {FORMAT_VERSION}")
    kind = config.setdefault("kind", "ctc")
    if kind not in KINDS:
        raise CtcspecError(f"{path}: unknown drafter kind {kind!r}; this ctcspec knows {', '.join(KINDS)}")
    for key in ("base", "draft"):
        if not isinstance(config.get(key), dict):
            raise CtcspecError(f"{path}: '{key}' must be a JSON object")
    curves = saved_curves(config, path)
    if any(b < 1 or not a >= 0 for curve in curves.values() for b, a in curve.items()):
        raise CtcspecError(f"{path}: 'acceptance_curve' must map search modes to {{tree budget: accepted}}")
    return config


def drafter_kind(directory: Path) -> str:
    """The kind (ctc, medusa, hydra, eagle) of the drafter saved in `directory`."""
    return read_config(directory)["kind"]


def _read_vocab_ids(tensors: dict, size: int, vocab_size: int, where: Path) -> torch.Tensor:
    vocab_ids = tensors.pop("vocab_ids", None)
    if vocab_ids is None or vocab_ids.ndim != 1 or len(vocab_ids) != size:
        raise CtcspecError(f"{where}: missing or wrong-sized vocab_ids")
    if vocab_ids.dtype.is_floating_point or len(vocab_ids) and (vocab_ids.min() < 0 or vocab_ids.max() >= vocab_size):
        raise CtcspecError(f"{where}: vocab_ids must be token ids in 0..{vocab_size - 1} of the base model")
    return vocab_ids.long()


def read_drafter(directory: Path, model: torch.nn.Module, kind: str | None = None) -> tuple[dict, object, torch.Tensor,
                                                                                       dict[str, torch.Tensor]]:
    """A saved drafter's config.json, module configuration, draft vocabulary and trained tensors, checked
    against the base `model`. `kind` (ctc, medusa, hydra, eagle), when given, must match the drafter's."""
    directory = Path(directory)
    config = read_config(directory)
    found = config["kind"]
    if kind is not None and found != kind:
        raise CtcspecError(f"drafter {str(directory)!r} is a {found} drafter, not {kind}")
    check_base(config["base"], model, str(directory))
    try:
        draft_config = module_config(found, config["draft"])
    except (TypeError, ValueError) as exc:
        raise CtcspecError(f"{directory / CONFIG_FILE}: bad 'draft' section ({exc})") from None
    try:
        tensors = load_file(str(directory / WEIGHTS_FILE))
    except FileNotFoundError:
        raise CtcspecError(f"drafter directory {str(directory)!r} has no {WEIGHTS_FILE}") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise CtcspecError(f"{directory / WEIGHTS_FILE} is corrupt or truncated ({exc})") from None
    vocab_ids = _read_vocab_ids(tensors, draft_config.draft_vocab_size, base_head(model)[0].shape[0],
                                directory / WEIGHTS_FILE)
    return config, draft_config, vocab_ids, tensors


def load_trained_weights(module: torch.nn.Module, tensors: dict[str, torch.Tensor], where: Path,
                         grown: tuple[str, ...] = ()) -> None:
    """Copy a saved drafter's trained tensors (any float type) into `module`'s parameters; those whose names start
    with one of `grown` (a warm start adding parts, e.g. feature layers) may be absent and keep their initial
    values."""
    expected = {k: v for k, v in module.named_parameters()
                if k in tensors or not any(k.startswith(prefix) for prefix in grown)}
    if set(tensors) != set(expected) or any(tensors[k].shape != expected[k].shape for k in expected):
        raise CtcspecError(f"{where / WEIGHTS_FILE} does not match its config.json (tensor names or shapes)")
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()}, strict=not grown)


def load_drafter_module(directory: Path, model: torch.nn.Module, kind: str | None = None):
    """The trained module on the base model's device (fp32 unless the base runs in another float type),
    and its config.json. `kind` (ctc, medusa, hydra, eagle), when given, must match the drafter's.
    On a base model running other CPU kernels than the stock ones the module runs them too."""
    config, draft_config, vocab_ids, tensors = read_drafter(directory, model, kind)
    module = build_module(config["kind"], draft_config, vocab_ids, model)
    load_trained_weights(module, tensors, Path(directory))
    dtype = model.dtype if model.dtype in (torch.float16, torch.bfloat16) else torch.float32
    module = module.to(device=base_head(model)[0].device, dtype=dtype).eval()  # parameters beside the buffers
    kernels = linear_kernels_of(model)
    if kernels in INSTALLED_KERNELS and not kernels_problem(module, kernels):
        install_draft_kernels(module, kernels)  # the drafter runs like its base
    return module, config


def shipped_drafter_dir(model_name: str, kind: str) -> Path | None:
    """The drafter of `kind` shipped in the package for an embedded default model, if any."""
    path = resources.files("ctcspec").joinpath(f"data/drafters/{model_name}-{kind}")
    return Path(str(path)) if path.is_dir() else None


def read_weights_header(directory: Path) -> dict[str, tuple[str, list[int]]]:
    """Tensor name -> (dtype, shape) of a drafter's model.safetensors, from its header alone (no tensor is
    read); the header must cover the whole file, so a truncated file is an error."""
    path = Path(directory) / WEIGHTS_FILE
    try:
        with safe_open(str(path), framework="pt") as weights:
            return {name: (weights.get_slice(name).get_dtype(), list(weights.get_slice(name).get_shape()))
                    for name in weights.keys()}
    except FileNotFoundError:
        raise CtcspecError(f"drafter directory {str(directory)!r} has no {WEIGHTS_FILE}") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise CtcspecError(f"{path} is corrupt or truncated ({exc})") from None


def read_vocab_ids(directory: Path) -> list[int]:
    """The draft vocabulary of a saved drafter (base model token ids): the one tensor read from its weights."""
    path = Path(directory) / WEIGHTS_FILE
    try:
        with safe_open(str(path), framework="pt") as weights:
            return weights.get_tensor("vocab_ids").tolist()
    except FileNotFoundError:
        raise CtcspecError(f"drafter directory {str(directory)!r} has no {WEIGHTS_FILE}") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise CtcspecError(f"{path} is corrupt, truncated or has no vocab_ids ({exc})") from None


def saved_curves(config: dict, where: Path | str = CONFIG_FILE) -> dict[str, dict[int, float]]:
    """The held-out acceptance curves of a config.json, by search mode: {mode: {tree budget: mean accepted
    draft tokens}} (the one reader of that field)."""
    curves = config.get("acceptance_curve", {})
    try:
        return {str(mode): {int(b): float(a) for b, a in curve.items()} for mode, curve in curves.items()}
    except (AttributeError, TypeError, ValueError):
        raise CtcspecError(f"{where}: 'acceptance_curve' must map search modes to {{tree budget: accepted}}") from None


def describe_drafter(directory: Path) -> dict:
    """What a saved drafter holds, from its config.json and its weights' header only (no base model):
    kind, module config, trained parameter count, draft vocabulary size, bytes on disk (config + weights),
    the base model it was trained for, its training summary and its held-out acceptance curves."""
    directory = Path(directory)
    config = read_config(directory)
    header = read_weights_header(directory)
    vocab = header.pop("vocab_ids", None)
    where = directory / WEIGHTS_FILE
    if vocab is None or len(vocab[1]) != 1:
        raise CtcspecError(f"{where}: missing or malformed vocab_ids")
    if config["draft"].get("draft_vocab_size", vocab[1][0]) != vocab[1][0]:
        raise CtcspecError(f"{where} does not match its config.json ({vocab[1][0]} draft vocabulary ids, "
                           f"config says {config['draft'].get('draft_vocab_size')})")
    training = config.get("training") if isinstance(config.get("training"), dict) else {}
    return {"path": str(directory), "kind": config["kind"], "draft": config["draft"],
            "parameters": sum(math.prod(shape) for _, shape in header.values()),
            "weights_dtype": sorted({dtype for dtype, _ in header.values()}),
            "draft_vocab_size": vocab[1][0],
            "size_bytes": sum((directory / name).stat().st_size for name in (CONFIG_FILE, WEIGHTS_FILE)),
            "base": config["base"], "training": {k: training[k] for k in TRAINING_KEYS if k in training},
            "acceptance_curve": saved_curves(config, directory / CONFIG_FILE)}
