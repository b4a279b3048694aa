"""ctcspec inside `model.generate()`: a decoding function for transformers' `custom_generate` hook.

    model.generate(input_ids, custom_generate=ctcspec.speculative_generate, drafter="ctc+lookup",
                   max_new_tokens=200, do_sample=True, temperature=0.7)

transformers prepares everything as for its own decoding — the generation_config merged with the caller's
settings, the logits processors, the stopping criteria (max length, EOS lists, the caller's own) — and calls
`speculative_generate` instead of its decoding loop. The caller's code, settings and streamer stay as they are.
"""

from __future__ import annotations

import sys

import torch
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList
from transformers.generation.utils import GenerateDecoderOnlyOutput

from ctcspec.assembly import build_engine
from ctcspec.decoding import Decoding
from ctcspec.drafters.base import Drafter
from ctcspec.engine import SpeculativeEngine
from ctcspec.errors import CtcspecError


def _generate_streamer():
    """The `streamer` given to `model.generate`. transformers (5.x) hands a custom_generate callable only the
    arguments its own loop lacks, so the streamer — already given the prompt by generate — is not among them;
    it is a local of the generate call that called us."""
    caller = sys._getframe(2)
    return caller.f_locals.get("streamer") if caller.f_code.co_name == "generate" else None


def _check_input(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
    if input_ids.shape[0] != 1:
        raise CtcspecError(f"speculative decoding runs one sequence at a time; got a batch of {input_ids.shape[0]} "
                           "(several prompts, or num_return_sequences > 1)")
    if attention_mask is not None and not bool(attention_mask.all()):
        raise CtcspecError("the attention mask hides some prompt tokens (padding); give the prompt without padding")


def speculative_generate(model: torch.nn.Module, input_ids: torch.Tensor, logits_processor: LogitsProcessorList,
                         stopping_criteria: StoppingCriteriaList, generation_config: GenerationConfig,
                         drafter: str | Drafter | None = None, engine: SpeculativeEngine | None = None,
                         **model_kwargs):
    """Decode `input_ids` (one sequence) with speculative decoding, as transformers' decoding loop would: the same
    tokens when greedy, the same distribution when sampling. Give a `drafter` (a name, assembled as `ctcspec
    generate` does it, its budget chosen for this machine: assembly.build_engine; or a Drafter, used as it is), or an
    `engine` built on `model` (to choose its backend, or to reuse it across calls rather than assemble one per call).
    Returns what generate returns: the sequences (prompt + new tokens), or a GenerateDecoderOnlyOutput holding them
    with return_dict_in_generate=True."""
    streamer = _generate_streamer()
    decoding = Decoding.from_generate(logits_processor, stopping_criteria, generation_config,  # first: num_beams
                                      input_ids.device)
    _check_input(input_ids, model_kwargs.get("attention_mask"))  # generate repeats the prompt num_beams times
    if (drafter is None) == (engine is None):
        raise CtcspecError("speculative_generate needs either drafter= or engine= (not both)")
    engine = engine or build_engine(model, drafter)
    if engine.model is not model:
        raise CtcspecError("the engine was built for another model than the one generating")
    max_context, limit = engine.backend.context_limit(engine.max_context)
    if generation_config.max_length > max_context:  # cut there, the output would silently fall short of generate's
        raise CtcspecError(f"max_length {generation_config.max_length} (prompt + new tokens) exceeds what "
                           f"speculative decoding can hold here: {limit}")
    prompt = input_ids[0].tolist()
    on_tokens = (lambda tokens: streamer.put(torch.tensor(tokens))) if streamer is not None else None
    try:
        result = engine.generate(prompt, generation_config.max_length - len(prompt), on_tokens=on_tokens,
                                 decoding=decoding)
    finally:
        if streamer is not None:  # a consumer iterating the streamer must not wait forever
            streamer.end()
    new = torch.tensor([result.tokens], dtype=input_ids.dtype, device=input_ids.device)
    sequences = torch.cat([input_ids, new], dim=1)
    return GenerateDecoderOnlyOutput(sequences=sequences) if generation_config.return_dict_in_generate else sequences
