"""Issue 13's option (a): torch.compile (inductor's CPU code generation) on the static backend's forward,
against the same backend run eagerly, side by side (docs/kernels.md quotes its output).

    python experiments/compile_static.py --scope layer   # each decoder layer's two halves compiled (~30 s)
    python experiments/compile_static.py --scope loop    # the whole 30-layer loop as one graph (~5 min)

Both compile with dynamic shapes, so one graph serves every tree size and context length; attention, the
embedding and (for `layer`) the final norm and LM head stay eager. Prints the compile time, the largest
logit difference from the eager backend after a prefill and a tree step, then two rounds of both cost
curves (ms per forward over q nodes after a 256-token context), interleaved round by round.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from ctcspec.backends.base import ForwardResult, node_depths
from ctcspec.backends.static import StaticBackend, rotate_half
from ctcspec.budget import verify_cost_curve
from ctcspec.models import DEFAULT_MODEL, load_model

SIZES = [1, 2, 4, 8, 16]


def attention_inputs(layer, x, cos, sin, head_dim: int):
    """Norm, q/k/v projections and rotary of one layer: (query, key, value), each (1, heads, q, head_dim)."""
    attention, q = layer.self_attn, x.shape[1]
    h = layer.input_layernorm(x)
    query = attention.q_proj(h).view(1, q, -1, head_dim).transpose(1, 2)
    key = attention.k_proj(h).view(1, q, -1, head_dim).transpose(1, 2)
    value = attention.v_proj(h).view(1, q, -1, head_dim).transpose(1, 2)
    return query * cos + rotate_half(query) * sin, key * cos + rotate_half(key) * sin, value


def attention_output_and_mlp(layer, x, out):
    """The rest of one layer after attention: output projection, residual, norm, MLP, residual."""
    x = x + layer.self_attn.o_proj(out.transpose(1, 2).reshape(1, x.shape[1], -1))
    return x + layer.mlp(layer.post_attention_layernorm(x))


class CompiledStatic(StaticBackend):
    """The static backend with `scope` (layer or loop) compiled; the same modules and cache."""

    def __init__(self, model: torch.nn.Module, scope: str):
        super().__init__(model)
        self.scope = scope
        if scope == "layer":
            self.inputs = torch.compile(attention_inputs, dynamic=True)
            self.rest = torch.compile(attention_output_and_mlp, dynamic=True)
        else:
            self.loop = torch.compile(self._loop, dynamic=True)

    def _layer(self, layer, x, cos, sin, keys, values, past: int, mask, causal: bool, inputs, rest):
        end = past + x.shape[1]
        query, key, value = inputs(layer, x, cos, sin, self.head_dim)
        keys[:, :, past:end] = key
        values[:, :, past:end] = value
        out = F.scaled_dot_product_attention(query, keys[:, :, :end], values[:, :, :end], attn_mask=mask,
                                             is_causal=causal, scale=layer.self_attn.scaling, enable_gqa=True)
        return rest(layer, x, out)

    def _loop(self, x, cos, sin, all_keys, all_values, past: int, mask, causal: bool):
        for layer, keys, values in zip(self.layers, all_keys, all_values, strict=True):
            x = self._layer(layer, x, cos, sin, keys, values, past, mask, causal,
                            attention_inputs, attention_output_and_mlp)
        return self.decoder.norm(x)

    @torch.inference_mode()
    def forward(self, cache, tokens, parents, hidden_layers=None):
        if hidden_layers:
            raise ValueError("this experiment returns the last layer's states only")
        past, q = cache.length, len(tokens)
        self._reserve(cache, past + q)
        ids = torch.tensor([tokens])
        positions = torch.tensor([[past + d for d in node_depths(parents)]])
        x = self.decoder.embed_tokens(ids)
        cos, sin = self.decoder.rotary_emb(x, positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        mask, causal = self._mask(parents, past)
        if self.scope == "layer":
            for layer, keys, values in zip(self.layers, cache.keys, cache.values, strict=True):
                x = self._layer(layer, x, cos, sin, keys, values, past, mask, causal, self.inputs, self.rest)
            hidden = self.decoder.norm(x)
        else:
            hidden = self.loop(x, cos, sin, cache.keys, cache.values, past, mask, causal)
        cache.length = past + q
        return ForwardResult(self.model.lm_head(hidden)[0], hidden[0] if hidden_layers is not None else None)


def largest_differences(eager: StaticBackend, compiled: StaticBackend, vocab: int) -> tuple[float, float]:
    """Largest |logit difference| after a 200-token prefill, then after a 5-node tree step."""
    caches = eager.new_cache(600), compiled.new_cache(600)
    prompt = torch.randint(0, vocab, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    steps = [(prompt, list(range(-1, len(prompt) - 1))), ([5, 6, 7, 8, 9], [-1, 0, 0, 1, 2])]
    diffs = []
    for tokens, parents in steps:
        a, b = (backend.forward(cache, tokens, parents)
                for backend, cache in zip((eager, compiled), caches, strict=True))
        diffs.append((a.logits - b.logits).abs().max().item())
    return diffs[0], diffs[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--scope", choices=("layer", "loop"), default="layer")
    parser.add_argument("--kernels", default="plain", help="as --kernels of the CLI (inductor traces stock layers)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, kernels=args.kernels).model
    eager = StaticBackend(model)
    start = time.perf_counter()
    compiled = CompiledStatic(model, args.scope)
    cache = compiled.new_cache(600)
    for tokens, parents in ([1] * 7, list(range(-1, 6))), ([1], [-1]), ([1, 2, 3], [-1, 0, 0]), ([1, 2], [-1, 0]):
        compiled.forward(cache, tokens, parents)  # the shapes and masks a generation meets: compiled here
    print(f"compile and warm-up: {time.perf_counter() - start:.0f} s")
    prefill_diff, tree_diff = largest_differences(eager, compiled, model.config.vocab_size)
    print(f"largest logit difference from eager: prefill {prefill_diff:.1e}, tree step {tree_diff:.1e}")
    print("| round | forward | " + " | ".join(f"q={q}" for q in SIZES) + " |")
    print("|---|---|" + "---|" * len(SIZES))
    for round_ in (1, 2):
        for name, backend in (("eager", eager), (f"compiled ({args.scope})", compiled)):
            curve = verify_cost_curve(backend, SIZES, repeats=7)
            print(f"| {round_} | {name} | " + " | ".join(f"{1000 * curve[q]:.1f}" for q in SIZES) + " |")
    print(f"(ms per forward, median of 7; {args.threads} thread(s); kernels {args.kernels})")


if __name__ == "__main__":
    main()
