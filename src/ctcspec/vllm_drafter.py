"""A ctcspec CTC drafter as a vLLM draft model: the directory `ctcspec export-vllm` writes, the speculative config
that runs it (vLLM's EAGLE proposer in parallel-drafting mode), and the vLLM plugin entry point that registers the
model vLLM builds for it (ctcspec/vllm_plugin.py).

The directory holds a config.json that vLLM reads as a Hugging Face config (the drafter's shape in Llama's field
names, `mask_token_id`, and ctcspec's own record under CONFIG_KEY) and the drafter's model.safetensors, unchanged.
The base model's embedding and LM head are not stored: vLLM shares the target model's with the drafter.

Invariants: only CTC-loss drafters with causal slot attention are exported (vLLM runs the slots in one causal
forward, so a bidirectional drafter's slots would not be the ones it was trained to give); the drafter is checked
against the base model (its fingerprint), as when ctcspec loads it, and again inside vLLM against the target.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ctcspec.errors import CtcspecError
from ctcspec.modules.files import CONFIG_FILE, WEIGHTS_FILE, read_config, read_drafter
from ctcspec.modules.layers import base_head

ARCHITECTURE = "EagleCTCDrafter"  # vLLM's "eagle" method renames any architecture not starting with "Eagle"
CONFIG_KEY = "ctcspec"            # ctcspec's record in the exported config.json: the draft config and base model
CAUSAL_CTC_NAME = "ctc-causal"    # the causal CTC drafter shipped for the default model: data/drafters/{model}-{this}


def register() -> None:
    """ctcspec's vLLM plugin (the vllm.general_plugins entry point in pyproject.toml): vLLM calls it in each of its
    processes; it names the module that builds the drafter (ctcspec/vllm_plugin.py), which vLLM imports only where
    it builds one. vLLM is imported here because it exists only in its own environment."""
    from vllm import ModelRegistry

    ModelRegistry.register_model(ARCHITECTURE, "ctcspec.vllm_plugin:CTCDrafterForVllm")


def vllm_export_problem(kind: str, draft: dict) -> str | None:
    """Why a saved drafter (its kind and its config.json's "draft" section) cannot run inside vLLM; None if it can."""
    if kind != "ctc":
        return f"only CTC drafters run inside vLLM, not {kind}"
    if draft.get("loss", "ctc") != "ctc":
        return "only drafters trained with the CTC loss run inside vLLM (their slots spell a CTC alignment)"
    if draft.get("feature_layers"):
        return ("this drafter reads earlier base layers (--feature-layers), and vLLM's EAGLE proposer hands a drafter "
                "the last layer's states only")
    if draft.get("slot_attention") != "causal":
        return ("vLLM drafts in one causal forward, and this drafter's slots attend bidirectionally; train one with "
                "--slot-attention causal (a warm start from this one: --init-from DIR --slot-attention causal)")
    return None


def vllm_draft_config(saved: dict, model: torch.nn.Module) -> dict:
    """The exported config.json: the drafter's shape in the field names vLLM reads, for base `model`."""
    draft, base = saved["draft"], model.config
    heads = draft["num_heads"]
    vocab_size = base_head(model)[0].shape[0]
    return {"model_type": "llama", "architectures": [ARCHITECTURE],
            "hidden_size": draft["hidden_size"], "intermediate_size": draft["intermediate_size"],
            "num_hidden_layers": draft.get("num_layers", 1), "num_attention_heads": heads,
            "num_key_value_heads": heads, "head_dim": draft["hidden_size"] // heads,
            "rms_norm_eps": draft["rms_eps"], "rope_parameters": {"rope_type": "default",
                                                                  "rope_theta": draft["rope_theta"]},
            "vocab_size": vocab_size, "max_position_embeddings": base.max_position_embeddings,
            "tie_word_embeddings": False,
            "mask_token_id": vocab_size,  # the id of vLLM's mask rows: no token has it, so a slot is never mistaken
            CONFIG_KEY: {"draft": draft, "base": saved["base"]}}


def speculative_config(directory: str | Path, num_slots: int) -> dict:
    """vLLM's --speculative-config for an exported drafter: K = num_slots + 1 proposals per step (the bonus row's and
    one per slot; the CTC draft is at most num_slots tokens, the rest padding)."""
    return {"method": "eagle", "model": str(directory), "num_speculative_tokens": num_slots + 1,
            "parallel_drafting": True}


def check_vllm_drafter(directory: str | Path) -> dict:
    """A saved drafter's config.json, checked to be one vLLM can run (before any model loads)."""
    saved = read_config(Path(directory))
    problem = vllm_export_problem(saved["kind"], saved["draft"])
    if problem:
        raise CtcspecError(f"drafter {str(directory)!r}: {problem}")
    return saved


def _check_out(out: Path, drafter_dir: Path) -> None:
    """--out may be new, empty, or an earlier export (which is replaced); never the drafter itself."""
    if out.exists() and not out.is_dir():
        raise CtcspecError(f"--out {str(out)!r} is a file, not a directory")
    if out.exists() and out.resolve() == drafter_dir.resolve():
        raise CtcspecError(f"--out {str(out)!r} is the drafter's own directory; export into another")
    others = sorted(p.name for p in out.iterdir() if p.name not in (CONFIG_FILE, WEIGHTS_FILE)) if out.exists() else []
    if others or ((out / CONFIG_FILE).exists() and not _is_export(out / CONFIG_FILE)):
        raise CtcspecError(f"--out {str(out)!r} holds other files ({', '.join(others) or CONFIG_FILE}); vLLM would "
                           "read them too: export into a new or empty directory")


def _is_export(config_file: Path) -> bool:
    """Whether a config.json is one this module wrote (anything unreadable is not)."""
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and CONFIG_KEY in config


def export_vllm_drafter(drafter_dir: str | Path, model: torch.nn.Module, out: str | Path) -> dict:
    """Write the drafter saved in `drafter_dir` (for base `model`) as a vLLM draft model directory `out`; return the
    speculative config that runs it."""
    drafter_dir, out = Path(drafter_dir), Path(out)
    check_vllm_drafter(drafter_dir)
    saved, draft_config, _, _ = read_drafter(drafter_dir, model)
    _check_out(out, drafter_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(drafter_dir / WEIGHTS_FILE, out / WEIGHTS_FILE)
    (out / CONFIG_FILE).write_text(json.dumps(vllm_draft_config(saved, model), indent=2) + "\n")
    return speculative_config(out.resolve(), draft_config.num_slots)
