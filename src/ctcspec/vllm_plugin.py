"""ctcspec's CTC drafter inside vLLM, through vLLM's extension points only: the model vLLM builds for an exported
drafter's architecture, which ctcspec's vLLM plugin registers (`ctcspec.vllm_drafter.register`, the
`vllm.general_plugins` entry point in pyproject.toml; `make vllm` installs ctcspec into vLLM's environment). A drafter
exported by `ctcspec export-vllm` (ctcspec/vllm_drafter.py) runs under vLLM's EAGLE proposer in parallel-drafting
mode:

    vllm serve MODEL --speculative-config \
        '{"method": "eagle", "model": OUT, "num_speculative_tokens": 7, "parallel_drafting": true}'

Each step, after the target verified the last draft, vLLM runs the drafter once, causally, over rows it lays out
per request:
- one row per newly verified position j: the target's final normed state h_j, the token x_{j+1} after it, position
  j; that is ctcspec's context unit u_j = fuse([h_j; E(x_{j+1})]), whose keys/values each draft layer writes into
  the drafter's paged KV cache, which vLLM keeps across steps (a later step overwrites what a slot left there);
- the bonus row (h_t, y, t): the unit u_t of the last position, y being the token the target just chose;
- K-1 mask rows (token `mask_token_id`) at positions t+1 .. t+K-1: ctcspec's slots, u_t + slot_embed[i];
- the rejected positions' rows, whose keys/values vLLM writes nowhere.
Every draft layer attends over those keys/values; context rows keep their unit as the next layer's input (as in
ctcspec, each layer's context keys/values come from the units), slot rows carry the layer's output. vLLM hands the
K rows [bonus, slots] of each request to `compute_logits`, which reads the slots' CTC best path (argmax per slot,
repeats merged, blanks dropped, "other" ending the draft) and returns logits whose argmax spells it, padded to K
tokens with id 0. The draft is a deterministic function of the context (the logits are 0 on the draft token and
-inf elsewhere: a one-hot draft distribution), so vLLM's verification keeps its output what it decodes alone:
token for token when greedy, in distribution when sampling.

A long prompt that vLLM prefills in chunks gets one unit per chunk boundary fused with the prompt's last token
instead of the token after it (vLLM's EAGLE proposer passes that token for unfinished prefills): drafts near it
may be worse, never the output.

Invariants: slot i attends to the context units 0..t and to slots 0..i, as a drafter trained with
`--slot-attention causal` does in ctcspec (the exporter refuses others); the weights are the saved drafter's; the
embedding and LM head rows are the target model's, which vLLM shares with the drafter after loading it, checked
against the base model the drafter was trained for at the first forward (vLLM's start-up profiling run).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.attention import Attention

from ctcspec.modules.ctc import CTCConfig
from ctcspec.modules.files import weight_fingerprint
from ctcspec.modules.layers import DraftLayer, RMSNorm
from ctcspec.search import collapse
from ctcspec.vllm_drafter import CONFIG_KEY, vllm_export_problem


def _flat(heads: torch.Tensor) -> torch.Tensor:
    """(1, heads, rows, head_dim) -> (rows, heads * head_dim), the layout vLLM's attention takes."""
    return heads[0].transpose(0, 1).reshape(heads.shape[2], -1)


class PagedDraftLayer(DraftLayer):
    """ctcspec's draft layer (its weights and arithmetic) attending through vLLM's paged attention: each row writes
    its keys/values at its position and attends causally to its request's positions up to its own."""

    def __init__(self, config: CTCConfig, vllm_config: VllmConfig, name: str):
        super().__init__(config)
        head_dim = config.hidden_size // config.num_heads
        self.attn = Attention(config.num_heads, head_dim, head_dim ** -0.5, num_kv_heads=config.num_heads,
                              cache_config=vllm_config.cache_config, prefix=f"{name}.attn")

    def paged(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x (rows, d) at positions (rows,) -> the layer's output (rows, d)."""
        rows, at = x[None], positions[None]
        keys, values = self.keys_values(rows, at)
        attn = self.attn(_flat(self.queries(rows, at)), _flat(keys), _flat(values))
        return self.feed_forward(x + self.o_proj(attn))


class CTCDrafterForVllm(nn.Module):
    """The model vLLM builds from an exported drafter's config.json (vLLM's model interface: forward,
    compute_logits, load_weights; `model.embed_tokens` and `lm_head` are where vLLM puts the target's)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        speculative = vllm_config.speculative_config
        hf_config = speculative.draft_model_config.hf_config
        saved = getattr(hf_config, CONFIG_KEY)
        self.config = config = CTCConfig(**saved["draft"])
        self.base = saved["base"]
        self.proposals = speculative.num_speculative_tokens  # K: the bonus row's and one per slot
        problem = vllm_export_problem("ctc", saved["draft"])
        if not speculative.parallel_drafting or not 2 <= self.proposals <= config.num_slots + 1:
            problem = (f"it runs with parallel_drafting and num_speculative_tokens from 2 to {config.num_slots + 1} "
                       f"(its {config.num_slots} slots + 1)")
        parallel = vllm_config.parallel_config
        if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1:
            problem = "it runs on one device per model replica (no tensor or pipeline parallelism yet)"
        if problem:
            raise ValueError(f"ctcspec's CTC drafter: {problem}")
        self.mask_token_id = hf_config.mask_token_id
        self.vocab_size = hf_config.vocab_size
        d = config.hidden_size
        first_layer = vllm_config.model_config.get_num_layers(vllm_config.parallel_config)  # names after the target's
        self.fuse = nn.Linear(2 * d, d, bias=False)
        self.slot_embed = nn.Parameter(torch.zeros(config.num_slots, d))
        self.layer = PagedDraftLayer(config, vllm_config, f"{prefix}ctc_drafter.layers.{first_layer}")
        self.more_layers = nn.ModuleList(
            PagedDraftLayer(config, vllm_config, f"{prefix}ctc_drafter.layers.{first_layer + i}")
            for i in range(1, config.num_layers))
        self.out_norm = RMSNorm(d, config.rms_eps)
        self.extra_head = nn.Linear(d, 2)  # [other, blank]
        self.register_buffer("vocab_ids", torch.zeros(config.draft_vocab_size, dtype=torch.long))
        self.register_buffer("mask_hidden", torch.zeros(d), persistent=False)  # vLLM's mask rows' state: unused
        self.model = nn.Module()  # vLLM sets model.embed_tokens (and lm_head) to the target's
        self.head_rows: tuple[torch.Tensor, torch.Tensor | None] | None = None  # set by bind_target

    @property
    def layers(self) -> list[PagedDraftLayer]:
        """The draft layers in order (the first keeps ctcspec's name for it, as the saved weights do)."""
        return [self.layer, *self.more_layers]

    def bind_target(self) -> None:
        """Take the target's LM head rows of the draft vocabulary, once vLLM has shared its head (or its tied
        embedding), after checking that the target is the base model the drafter was trained for."""
        head = getattr(self, "lm_head", None) or self.model.embed_tokens
        weight = head.weight[:self.vocab_size]
        dtype = str(weight.dtype).removeprefix("torch.")
        expected = {self.base.get("lm_head_sha256"), self.base.get("lm_head_sha256_rounded", {}).get(dtype)}
        if weight_fingerprint(weight) not in expected:
            raise ValueError("the ctcspec CTC drafter was trained for another base model (its LM head fingerprint "
                             "differs from this target's); export a drafter trained for this model")
        bias = getattr(head, "bias", None)
        self.head_rows = (weight[self.vocab_ids], None if bias is None else bias[self.vocab_ids])

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden_states: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One causal pass over the rows vLLM laid out (module docstring): a row whose token is `mask_token_id` is a
        slot, anchored at the last row before it that is not (its request's bonus row, since the mask rows follow it);
        every other row is a context unit, which each layer sees as its input (its keys/values go to the cache) and
        which keeps its unit as the next layer's input. Returns the rows' outputs twice (vLLM's EAGLE interface)."""
        if inputs_embeds is not None:
            raise NotImplementedError("the ctcspec CTC drafter takes token ids, not embeddings")
        if self.head_rows is None:
            self.bind_target()
        is_slot = (input_ids == self.mask_token_id)[:, None]
        embeds = self.model.embed_tokens(input_ids.masked_fill(is_slot[:, 0], 0))
        units = self.fuse(torch.cat([hidden_states.to(embeds.dtype), embeds], dim=-1))
        rows = torch.arange(len(input_ids), device=input_ids.device)
        anchor = rows.masked_fill(is_slot[:, 0], -1).cummax(0).values.clamp(min=0)  # a slot's bonus row
        slot = (rows - anchor - 1).clamp(0, self.config.num_slots - 1)
        x = torch.where(is_slot, units[anchor] + self.slot_embed[slot], units)
        for layer in self.layers:
            x = torch.where(is_slot, layer.paged(x, positions), units)
        return x, x

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The K sampled rows of each request (request-major) -> logits (rows, vocab) whose argmax is the draft."""
        slots = hidden_states.view(-1, self.proposals, hidden_states.shape[-1])[:, 1:]
        x = self.out_norm(slots)
        weight, bias = self.head_rows
        classes = torch.cat([F.linear(x, weight, bias), self.extra_head(x)], dim=-1).argmax(-1)
        drafts = torch.zeros(len(classes), self.proposals, dtype=torch.long, device=x.device)  # padded with id 0
        for request, alignment in enumerate(classes.tolist()):
            draft = collapse(alignment, self.config.blank_id, self.config.other_id)
            drafts[request, :len(draft)] = self.vocab_ids[list(draft)]
        logits = torch.full((drafts.numel(), self.vocab_size), float("-inf"), dtype=x.dtype, device=x.device)
        return logits.scatter_(1, drafts.view(-1, 1), 0.0)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The saved drafter's tensors (model.safetensors, any float type) into the drafter's parameters."""
        own = {name: p for name, p in self.named_parameters() if ".attn." not in name} | {"vocab_ids": self.vocab_ids}
        loaded = set()
        for name, tensor in weights:
            if name not in own or own[name].shape != tensor.shape:
                raise ValueError(f"the ctcspec CTC drafter has no tensor {name} of shape {tuple(tensor.shape)}")
            with torch.no_grad():
                own[name].copy_(tensor)
            loaded.add(name)
        if own.keys() - loaded:
            raise ValueError(f"the ctcspec CTC drafter's weights lack {', '.join(sorted(own.keys() - loaded))}")
        return {name for name, _ in self.named_parameters()}
