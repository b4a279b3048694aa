"""Draft networks, one file each, and the one registry of their kinds.

A draft network (a "module") is an `nn.Module` that reads the base model's last hidden states and
scores draft tokens; the drafters in ctcspec/drafters/ run them. Every module class offers the same
training interface (forward -> loss, target_count, draft_depth, search_modes, offline_nodes, feature_layers), so
training and evaluation never ask which kind they hold. files.py is the saved-drafter format.
"""

from __future__ import annotations

import torch

from ctcspec.modules.ctc import CTCConfig, CTCModule
from ctcspec.modules.eagle import EagleModule
from ctcspec.modules.heads import HeadsConfig
from ctcspec.modules.hydra import HydraModule
from ctcspec.modules.layers import base_head
from ctcspec.modules.medusa import MedusaModule

MODULES: dict[str, tuple[type, type[torch.nn.Module]]] = {
    "ctc": (CTCConfig, CTCModule),
    "medusa": (HeadsConfig, MedusaModule),
    "hydra": (HeadsConfig, HydraModule),
    "eagle": (HeadsConfig, EagleModule),
}
KINDS = tuple(MODULES)


def module_config(kind: str, fields: dict):
    """The configuration object of a `kind` module from its fields (a saved config.json's "draft")."""
    config_class = MODULES[kind][0]
    return config_class(**({**fields, "kind": kind} if config_class is HeadsConfig else fields))


def build_module(kind: str, config, vocab_ids: torch.Tensor, model: torch.nn.Module) -> torch.nn.Module:
    """A freshly initialised `kind` module for base `model`, drafting over the tokens `vocab_ids`."""
    head_weight, head_bias = base_head(model)
    return MODULES[kind][1](config, vocab_ids.to(head_weight.device), model.get_input_embeddings().weight,
                            head_weight, head_bias)


def parameter_count(module: torch.nn.Module) -> int:
    """Trainable parameters (the frozen base embedding and LM head rows are buffers, not counted)."""
    return sum(p.numel() for p in module.parameters())
