"""How the base model picks each next token and when it stops: exactly as transformers' `generate` would.

transformers prepares the settings — the model's generation_config merged with the caller's options and
validated — into logits processors (repetition penalty, no-repeat n-grams, suppressed and bad words, minimum
length, temperature, top-k, top-p, min-p, ...) and stopping criteria (max length, EOS, stop strings, the
caller's own). The engine applies the processors at every verified node to that node's own prefix (the
sequence, then the draft path down to it) in float32, as generate does, and takes the argmax of the processed
scores, or draws from their softmax when sampling. Each emitted token is checked against the stopping criteria
with its own prefix (and no scores, as generate passes none without output_scores). So speculative decoding
changes how many forwards run, never which tokens come out (or, sampling, their distribution).

Processors are called once per emitted token, in order, as in generate, and also for a token a step chose past a
stop (then dropped); a processor keeping state between calls could drift from generate, so only those that are
pure functions of (prefix, scores) are accepted, anything else is refused by name (`check_processors`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList
from transformers.generation import logits_process as lp
from transformers.generation.configuration_utils import GenerationMode
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

from ctcspec.errors import CtcspecError, one_line

# Row-wise functions of (prefix, scores), with no state carried between calls: exact at any node, in any order.
# (The two Encoder* ones read the prompt, fixed for a generation.)
PURE_PROCESSORS = (
    lp.EncoderNoRepeatNGramLogitsProcessor, lp.EncoderRepetitionPenaltyLogitsProcessor, lp.EpsilonLogitsWarper,
    lp.EtaLogitsWarper, lp.ExponentialDecayLengthPenalty, lp.ForcedBOSTokenLogitsProcessor,
    lp.ForcedEOSTokenLogitsProcessor, lp.InfNanRemoveLogitsProcessor, lp.LogitNormalization,
    lp.MinLengthLogitsProcessor, lp.MinNewTokensLengthLogitsProcessor, lp.MinPLogitsWarper,
    lp.NoBadWordsLogitsProcessor, lp.NoRepeatNGramLogitsProcessor, lp.PrefixConstrainedLogitsProcessor,
    lp.RepetitionPenaltyLogitsProcessor, lp.SequenceBiasLogitsProcessor, lp.SuppressTokensAtBeginLogitsProcessor,
    lp.SuppressTokensLogitsProcessor, lp.TemperatureLogitsWarper, lp.TopHLogitsWarper, lp.TopKLogitsWarper,
    lp.TopPLogitsWarper, lp.TypicalLogitsWarper,
)
# Below this, the scores divided by the temperature overflow float32 and sampling fails, in generate as here (0 is
# greedy); vLLM draws the same line.
MIN_TEMPERATURE = 1e-5
# Outputs the engine does not produce; asked for, they are refused rather than returned empty.
UNSUPPORTED_OUTPUTS = ("output_scores", "output_logits", "output_attentions", "output_hidden_states")


def check_processors(processors: Sequence) -> None:
    """Refuse, naming them, processors the engine cannot apply exactly (stateful, or running a model of their own)."""
    unknown = sorted({type(p).__name__ for p in processors if type(p) not in PURE_PROCESSORS})
    if unknown:
        raise CtcspecError(f"speculative decoding cannot apply the logits processor(s) {', '.join(unknown)} exactly "
                           "(only processors that are pure functions of the prefix and the scores are supported)")


def eos_ids(config: GenerationConfig) -> frozenset[int]:
    eos = config.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else (int(t) for t in eos))


@dataclass(frozen=True)
class Decoding:
    """What `generate` would run for one prompt: processors, stopping criteria, greedy or sampling."""

    processors: LogitsProcessorList = field(default_factory=LogitsProcessorList)
    stopping: StoppingCriteriaList = field(default_factory=StoppingCriteriaList)
    do_sample: bool = False
    eos: frozenset[int] = frozenset()
    generator: torch.Generator | None = None   # sampling draws from it (None: torch's global generator, as HF)
    config: GenerationConfig | None = None     # the generation config generate prepared, for reports
    device: torch.device | str = "cpu"         # where generate keeps the ids: processors and criteria run there

    @classmethod
    def from_generate(cls, logits_processor: LogitsProcessorList, stopping_criteria: StoppingCriteriaList,
                      generation_config: GenerationConfig, device: torch.device | str,
                      generator: torch.Generator | None = None) -> Decoding:
        """From the arguments transformers' generate hands a custom decoding function (`device`: its input ids')."""
        mode = generation_config.get_generation_mode()
        if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
            raise CtcspecError(f"the settings ask for {mode.value.replace('_', ' ')}; speculative decoding reproduces "
                               "greedy decoding and sampling only (num_beams=1, no penalty_alpha, dola_layers, "
                               "force_words_ids or constraints)")
        if (generation_config.num_return_sequences or 1) > 1:
            raise CtcspecError("speculative decoding returns one sequence per prompt; use num_return_sequences=1")
        asked = [name for name in UNSUPPORTED_OUTPUTS if getattr(generation_config, name, False)]
        if asked:
            raise CtcspecError(f"speculative decoding does not return {', '.join(asked)}; leave them unset")
        check_processors(logits_processor)
        # The engine itself stops at max_new_tokens and at the EOS ids (the same ones these criteria hold); leaving
        # them out spares the plain greedy loop a criteria call, and a device sync, per token.
        stopping = StoppingCriteriaList(c for c in stopping_criteria
                                        if not isinstance(c, MaxLengthCriteria | EosTokenCriteria))
        return cls(logits_processor, stopping, bool(generation_config.do_sample), eos_ids(generation_config),
                   generator, generation_config, device)


def _prepared(model, input_ids, logits_processor, stopping_criteria, generation_config, **model_kwargs):
    """A custom_generate function that decodes nothing: it returns what generate prepared for decoding."""
    return logits_processor, stopping_criteria, generation_config


def decoding_for(model: torch.nn.Module, prompt_ids: Sequence[int], seed: int | None = None,
                 **settings) -> Decoding:
    """The decoding `model.generate(prompt, **settings)` would run — greedy unless settings set do_sample=True —
    prepared by transformers itself, for this prompt (length criteria count from it). `seed` makes sampling
    reproducible (its own generator)."""
    settings.setdefault("do_sample", False)
    ids = torch.tensor([list(prompt_ids)], device=model.device)
    try:
        prepared = model.generate(ids, attention_mask=torch.ones_like(ids), custom_generate=_prepared, **settings)
    except (ValueError, TypeError) as exc:
        raise CtcspecError(f"invalid generation settings: {one_line(exc)}") from None
    generator = None if seed is None else torch.Generator(model.device).manual_seed(int(seed))
    return Decoding.from_generate(*prepared, device=ids.device, generator=generator)


def settings_in_effect(model: torch.nn.Module, settings: dict) -> dict:
    """The knobs `model.generate(do_sample=False, **settings)` decodes with, as transformers merges them (settings
    over the model's generation_config over transformers' defaults): do_sample and repetition_penalty, and when
    sampling temperature, top_k, top_p and min_p. Invalid settings are a CtcspecError."""
    config = decoding_for(model, [0], max_new_tokens=1, **settings).config
    sampling = ("temperature", "top_k", "top_p", "min_p") if config.do_sample else ()
    keys = ("do_sample", "repetition_penalty", *sampling)
    return {key: getattr(config, key) for key in keys}


class NodeChooser:
    """The base model's next token after each verified node, chosen as generate would choose it there.

    `logits` are the verification forward's (nodes, vocab); node 0 follows `sequence` (whose last token is the
    root), node n follows `sequence` + the draft tokens on the path down to n.
    """

    def __init__(self, decoding: Decoding, logits: torch.Tensor, sequence: torch.Tensor):
        self.decoding, self.logits, self.sequence = decoding, logits, sequence
        plain = not decoding.do_sample and not decoding.processors
        self.greedy = logits.argmax(dim=-1).tolist() if plain else None

    def __call__(self, node: int, drafted: list[int]) -> int:
        if self.greedy is not None:
            return self.greedy[node]
        scores = self.logits[node : node + 1].to(dtype=torch.float32, device=self.decoding.device)  # as generate
        if self.decoding.processors:
            prefix = torch.cat([self.sequence, torch.tensor(drafted, dtype=self.sequence.dtype)])
            scores = self.decoding.processors(prefix[None].to(self.decoding.device), scores)
        if self.decoding.do_sample:
            probs = torch.softmax(scores, dim=-1)
            return int(torch.multinomial(probs, 1, generator=self.decoding.generator))
        return int(scores.argmax(dim=-1))
