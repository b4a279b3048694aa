"""Shared fixtures: tiny randomly initialised models of several architectures, and the HF oracle.

The suite never writes to the user's cache: CTCSPEC_HOME points at a fresh temporary directory (for
this process and the CLI subprocesses it starts). An embedded model the user's cache already holds
is linked in read-only, so it is not exported again.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GemmaConfig, GenerationConfig, LlamaConfig, Qwen2Config

from ctcspec.cli import main


def _private_home() -> Path:
    user_home = Path(os.environ.get("CTCSPEC_HOME", Path.home() / ".cache" / "ctcspec"))
    home = Path(tempfile.mkdtemp(prefix="ctcspec-test-home-"))
    exported = user_home / "models" / "smollm2-135m-instruct"
    if (exported / "model.safetensors").is_file():
        (home / "models").mkdir()
        (home / "models" / exported.name).symlink_to(exported, target_is_directory=True)
    return home


os.environ["CTCSPEC_HOME"] = str(_private_home())

VOCAB = 96
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=320,
               # A wide init spreads the logits, so greedy choices are not decided by float noise.
               initializer_range=0.2, bos_token_id=1, eos_token_id=None, pad_token_id=None)
ARCHS = {
    "llama": lambda: LlamaConfig(**_COMMON),
    "qwen2": lambda: Qwen2Config(**_COMMON),
    "gemma": lambda: GemmaConfig(**_COMMON, head_dim=16),
}


def tiny_model(arch: str, seed: int = 0, attn: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(ARCHS[arch](), attn_implementation=attn).eval()
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture(scope="session", params=sorted(ARCHS))
def arch_model(request):
    return request.param, tiny_model(request.param)


def hf_greedy(model, prompt: list[int], max_new_tokens: int, eos: int | None = None) -> list[int]:
    """The oracle: transformers' own greedy generate."""
    ids = torch.tensor([prompt])
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos,
                              pad_token_id=eos if eos is not None else 0)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return out[0, len(prompt):].tolist()


CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def save_tiny_model_dir(path, arch: str = "llama", max_positions: int = 320, **config_overrides):
    """A complete model directory (weights + a word-level tokenizer) for CLI tests; `config_overrides` set
    fields of the architecture's tiny config."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(VOCAB - 3)]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>")
    tokenizer.chat_template = CHAT_TEMPLATE
    config = ARCHS[arch]()
    config.max_position_embeddings = max_positions
    for key, value in config_overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = None
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


def run_cli(capsys, *argv):
    """One ctcspec command in this process: its exit code, stdout and stderr."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err
