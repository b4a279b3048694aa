"""Training a draft module on distilled data (self-distillation): the CTC module, or a baseline
(Medusa, Hydra, EAGLE-style) with the same data, anchors and loop; each module computes its own loss.

Each batch: the frozen base model runs the distilled sequences once (teacher forcing) for its last
hidden states (and those of earlier layers a drafter reads, --feature-layers); at a random subset of
answer positions t ("anchors") the module's N slots must spell out the base model's next K tokens
x_{t+2} .. x_{t+1+K} (x_{t+1} is the root, already known) under CTC loss. Tokens outside the draft
vocabulary become the "other" class, which ends a draft.

Checkpoints (module, optimizer, schedule, step) are written atomically every `checkpoint_every`
steps; `resume=True` continues from the last one. Batches are a pure function of (seed, step)
(data.py), so a resumed run sees the same data a straight run would. Runs unchanged under `accelerate launch`:
every process takes its share of each batch, gradients are averaged by accelerate.
"""

from __future__ import annotations

import json
import math
import pickle
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from ctcspec.errors import CtcspecError
from ctcspec.modules import KINDS, build_module
from ctcspec.modules.ctc import GROWN_PARAMETERS, LOSSES, SLOT_ATTENTION, WARM_START_FREE, WARM_START_GROWS, CTCConfig
from ctcspec.modules.files import drafter_base, load_trained_weights, read_drafter, save_drafter
from ctcspec.modules.heads import HeadsConfig
from ctcspec.modules.layers import LAYER_INITS, base_rope_theta, copy_base_layer
from ctcspec.training.data import (
    anchor_generator,
    batch_hidden,
    batch_order,
    check_data_base,
    check_feature_layers,
    choose_anchors,
    data_digest,
    draft_targets,
    draft_vocabulary,
    fill_hidden_cache,
    open_hidden_cache,
    pad_batch,
    read_data,
    split_heldout,
)
from ctcspec.training.evaluate import SEARCH_BUDGETS, acceptance_curve

CHECKPOINT = "checkpoint.pt"
HISTORY_BUDGETS = (1, 4, 16)  # the tree budgets of the acceptance recorded every eval_every steps (eval_history)
RESUMABLE_CHANGES = frozenset({"time_limit_s", "eval_every", "eval_samples", "final_eval_samples", "checkpoint_every",
                               "hidden_cache"})


@dataclass
class TrainConfig:
    kind: str = "ctc"                # ctc | medusa | hydra | eagle (the baselines share data and loop)
    num_slots: int = 6               # defaults: the shipped SmolLM2 drafter's recipe (docs/ctc.md)
    target_tokens: int = 4           # ctc: K tokens per alignment; medusa/hydra: heads; eagle: draft depth
    intermediate_size: int = 0       # MLP width; 0 = the kind's default (ctc/eagle: the base model's; heads 1024)
    slot_attention: str = ""         # bidirectional | causal; empty: bidirectional, or the warm start's
    loss: str = "ctc"
    layer_init: str = "random"       # ctc: "base" starts the draft layer as the base model's last layer
    num_layers: int = 1              # ctc: draft layers over the slots
    prefix_weight: float = 0.0       # ctc: weight of -log P(draft starts with the first k targets) beside CTC
    soft_weight: float = 0.0         # ctc: weight of the KL term to the base model's next-token distributions
    feature_layers: str = ""         # ctc: base layers whose states join the last layer's, e.g. "8,16"; empty: none,
                                     # or the warm start's
    draft_vocab: int = 8192          # most frequent answer tokens; 0 = the whole vocabulary
    steps: int = 0                   # optimizer steps; 0 = `epochs` passes over the data
    epochs: float = 2.0
    batch_size: int = 32             # sequences per step
    anchors_per_sequence: int = 64   # drafts per sequence per step (position subsampling)
    max_length: int = 1024
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: float = 0.05
    heldout_every: int = 50          # every 50th sample is held out (by position; in a data store, by prompt hash)
    eval_every: int = 100
    eval_samples: int = 16           # held-out samples for the progress bar's acceptance proxy
    final_eval_samples: int = 64     # held-out samples for the saved acceptance curves
    checkpoint_every: int = 200
    seed: int = 0
    time_limit_s: float = 0.0        # stop early (and still save the drafter) after this long; 0 = no limit
    max_train_samples: int = 0       # train on a seeded random subset of this many sequences; 0 = all
    hidden_cache: str = ""           # directory caching base hidden states (fp16) per sequence, shared by runs
    init_from: str = ""              # a saved drafter of this kind and shape to continue from (warm start)

    def __post_init__(self) -> None:
        """Options that cannot train are user errors, found before the model or data load."""
        for name in ("num_slots", "target_tokens", "batch_size", "anchors_per_sequence", "max_length", "eval_every",
                     "eval_samples", "final_eval_samples", "checkpoint_every", "heldout_every", "num_layers"):
            if getattr(self, name) < 1:
                raise CtcspecError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("steps", "epochs", "lr", "time_limit_s", "max_train_samples", "draft_vocab", "intermediate_size",
                     "prefix_weight", "soft_weight"):
            if getattr(self, name) < 0:
                raise CtcspecError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if self.kind == "ctc" and self.target_tokens > self.num_slots:
            raise CtcspecError(f"--target-tokens ({self.target_tokens}) must not exceed --num-slots ({self.num_slots})")
        for name, allowed in (("slot_attention", SLOT_ATTENTION), ("loss", LOSSES), ("layer_init", LAYER_INITS)):
            if getattr(self, name) not in allowed and (name, getattr(self, name)) != ("slot_attention", ""):
                raise CtcspecError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}")
        if self.kind != "ctc" and self.layer_init != "random":
            raise CtcspecError("--layer-init base is for --kind ctc")
        for name in ("prefix_weight", "soft_weight"):
            if not math.isfinite(getattr(self, name)):
                raise CtcspecError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(self, name)}")
        if self.kind != "ctc" and (self.num_layers != 1 or self.prefix_weight or self.soft_weight):
            raise CtcspecError("--num-layers, --prefix-weight and --soft-weight are for --kind ctc")
        if self.loss != "ctc" and (self.prefix_weight or self.soft_weight):
            raise CtcspecError("--prefix-weight and --soft-weight go with --loss ctc")
        if self.layer_init != "random" and self.num_layers != 1:
            raise CtcspecError("--layer-init base copies the base model's last layer into one draft layer; "
                               "use it with --num-layers 1")
        try:
            layers = self.feature_layer_ids
        except ValueError:
            raise CtcspecError(f"--feature-layers must be comma-separated layer numbers, got {self.feature_layers!r}")\
                from None
        if len(set(layers)) != len(layers) or any(i < 0 for i in layers):
            raise CtcspecError(f"--feature-layers must be distinct layer numbers of at least 0, "
                               f"got {self.feature_layers!r}")
        if self.kind != "ctc" and layers:
            raise CtcspecError("--feature-layers is for --kind ctc")
        if self.init_from and self.layer_init != "random":
            raise CtcspecError("--init-from starts from a trained drafter's layer; --layer-init base would replace it")


    @property
    def feature_layer_ids(self) -> tuple[int, ...]:
        return tuple(int(i) for i in self.feature_layers.split(",") if i.strip())


def _lr_factor(step: int, total: int, warmup: float) -> float:
    warm = max(1, int(total * warmup))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def module_config(config: TrainConfig, model, draft_vocab_size: int) -> CTCConfig | HeadsConfig:
    """The drafter module's architecture for this base model and training configuration."""
    hidden_size = model.config.hidden_size
    base_inner = getattr(model.config, "intermediate_size", 4 * hidden_size)
    if config.kind == "ctc":
        like_base = {}
        if config.layer_init == "base":  # the copied layer keeps the base's rotary base and norm epsilon
            try:
                like_base = {"rope_theta": base_rope_theta(model), "rms_eps": float(model.config.rms_norm_eps)}
            except (AttributeError, ValueError) as exc:
                raise CtcspecError(f"--layer-init base: {exc}") from None
        check_feature_layers(config.feature_layer_ids, model)
        return CTCConfig(hidden_size=hidden_size, num_heads=model.config.num_attention_heads,
                           intermediate_size=config.intermediate_size or base_inner,
                           draft_vocab_size=draft_vocab_size, num_slots=config.num_slots,
                           target_tokens=config.target_tokens, slot_attention=config.slot_attention,
                           loss=config.loss, num_layers=config.num_layers, prefix_weight=config.prefix_weight,
                           soft_weight=config.soft_weight, feature_layers=config.feature_layer_ids, **like_base)
    if config.kind not in KINDS:
        raise CtcspecError(f"unknown drafter kind {config.kind!r}; choose from: {', '.join(KINDS)}")
    inner = config.intermediate_size or (base_inner if config.kind == "eagle" else 1024)
    return HeadsConfig(kind=config.kind, hidden_size=hidden_size, draft_vocab_size=draft_vocab_size,
                       depth=config.target_tokens, intermediate_size=inner,
                       num_heads=model.config.num_attention_heads)


def train(model, data_dirs: list[Path], out_dir: Path, config: TrainConfig, resume: bool = False,
          progress: bool = True) -> dict:
    """Train a `config.kind` drafter for `model` on the distilled samples of `data_dirs`; writes it to `out_dir`."""
    from accelerate import Accelerator, DistributedDataParallelKwargs

    out_dir = Path(out_dir)
    # every process builds the same frozen buffers (base embedding, LM head rows): nothing to broadcast
    accelerator = Accelerator(cpu=model.device.type == "cpu",
                              kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    device = accelerator.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    model = model.to(device).eval()
    model.requires_grad_(False)
    check_data_base([Path(d) for d in data_dirs], model)
    samples = read_data([Path(d) for d in data_dirs])
    train_set, heldout = split_heldout(samples, config.heldout_every)
    digest = data_digest(samples)
    checkpoint_path = out_dir / CHECKPOINT
    init = read_drafter(Path(config.init_from), model, config.kind) if config.init_from else None
    config = warm_start_config(config, init[1] if init else None)
    state = None
    if resume:
        if not checkpoint_path.exists():
            raise CtcspecError(f"--resume: no checkpoint at {checkpoint_path}")
        try:
            state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        except (RuntimeError, EOFError, pickle.UnpicklingError) as exc:
            reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            raise CtcspecError(f"--resume: {checkpoint_path} is corrupt or truncated ({reason}); "
                               "start again with a new --out") from None
        if not isinstance(state, dict) or not isinstance(state.get("train_config"), dict):
            raise CtcspecError(f"--resume: {checkpoint_path} is not a ctcspec training checkpoint")
        changed = sorted(k for k, v in asdict(config).items()
                         if k not in RESUMABLE_CHANGES and state["train_config"].get(k, getattr(TrainConfig(), k)) != v)
        if changed:
            raise CtcspecError(f"--resume with different training options ({', '.join(changed)}); "
                               "use the original options or a new --out")
        if state.get("data_digest", digest) != digest:
            raise CtcspecError("--resume: the training data changed since the checkpoint (a data store that gained "
                               "shards?); the batches would differ: use the data it started with, or a new --out")
        vocab_ids = state["vocab_ids"]
    elif init is not None:
        vocab_ids = init[2]  # the warm start keeps its draft vocabulary
    else:
        vocab_ids = draft_vocabulary(train_set, config.draft_vocab, model.get_output_embeddings().weight.shape[0])
    cache_dir = open_hidden_cache(Path(config.hidden_cache), model) if config.hidden_cache else None
    if config.max_train_samples and config.max_train_samples < len(train_set):
        picks = sorted(random.Random(config.seed).sample(range(len(train_set)), config.max_train_samples))
        train_set = [train_set[i] for i in picks]  # after the vocabulary, which always sees all the data
    draft_config = module_config(config, model, len(vocab_ids))
    if init is not None:
        _check_same_shape(config.init_from, init[1], draft_config)
    torch.manual_seed(config.seed)
    module = build_module(config.kind, draft_config, vocab_ids, model)
    if init is not None and state is None:
        grown = GROWN_PARAMETERS if module.feature_layers != getattr(init[1], "feature_layers", ()) else ()
        load_trained_weights(module, init[3], Path(config.init_from), grown)
    elif config.layer_init == "base" and state is None:
        try:
            copy_base_layer(module.layer, model)
        except ValueError as exc:
            raise CtcspecError(f"--layer-init base: {exc}") from None
    module = module.to(device)
    optimizer = torch.optim.AdamW(module.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train_set) / config.batch_size)
    total_steps = config.steps or max(1, int(config.epochs * steps_per_epoch))
    step, elapsed = 0, 0.0
    scaling = {"answer_tokens_seen": 0, "eval_history": []}  # the scaling curve: held-out acceptance by tokens seen
    if state is not None:
        module.load_state_dict(state["module"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state["elapsed_s"]
        scaling = state.get("scaling", scaling)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, total_steps, config.warmup),
                                                  last_epoch=step - 1 if step else -1)
    if state is not None:
        scheduler.load_state_dict(state["scheduler"])
    module, optimizer = accelerator.prepare(module, optimizer)
    inner = accelerator.unwrap_model(module)
    rank, world = accelerator.process_index, accelerator.num_processes
    start = time.perf_counter() - elapsed  # the clock, and --time-limit-s, count the cache's filling
    if cache_dir is not None:
        planned = planned_samples(train_set, config, steps_per_epoch, step, total_steps, rank, world)
        fill_hidden_cache(model, planned, cache_dir, config.max_length, inner.feature_layers,
                          deadline=start + config.time_limit_s if config.time_limit_s else None,
                          progress=progress and accelerator.is_main_process)
        accelerator.wait_for_everyone()
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step",
               disable=not (progress and accelerator.is_main_process))
    smoothed, proxy = None, None
    stopped_early = False
    while step < total_steps:
        if config.time_limit_s and _out_of_time(accelerator, time.perf_counter() - start > config.time_limit_s):
            stopped_early = True
            break
        epoch, index = divmod(step, steps_per_epoch)
        batches = batch_order(train_set, config.batch_size, config.seed, epoch)
        if index >= len(batches):
            step += 1
            continue
        share = process_share(batches[index], rank, world)
        tokens, lengths, prompt_lens = pad_batch([train_set[i] for i in share], config.max_length, device)
        generators = [anchor_generator(config.seed, step, train_set[i]["index"]) for i in share]
        anchors, valid = choose_anchors(lengths.cpu(), prompt_lens.cpu(), config.anchors_per_sequence, generators)
        anchors, valid = anchors.to(device), valid.to(device)
        hidden = batch_hidden(model, [train_set[i] for i in share], tokens, lengths, cache_dir, inner.feature_layers)
        targets, target_lengths = draft_targets(inner, tokens, lengths, anchors, valid, inner.target_count)
        loss = module(hidden, tokens, anchors, targets, target_lengths)  # through the wrapper: accelerate syncs
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        scaling["answer_tokens_seen"] += int(accelerator.reduce((lengths - prompt_lens).clamp(min=0).sum(), "sum"))
        value = accelerator.reduce(loss.detach(), "mean").item()  # over processes: what one process would log
        smoothed = value if smoothed is None else 0.95 * smoothed + 0.05 * value
        if accelerator.is_main_process and (step % config.eval_every == 0 or step == total_steps):
            curve = acceptance_curve(inner, model, heldout[:config.eval_samples], budgets=HISTORY_BUDGETS,
                                     max_length=config.max_length)
            proxy = 1 + curve[16]
            scaling["eval_history"].append({"step": step, "answer_tokens_seen": scaling["answer_tokens_seen"],
                                             "accepted": {str(b): round(a, 4) for b, a in curve.items()}})
        if accelerator.is_main_process and (step % config.checkpoint_every == 0 or step == total_steps):
            _save_checkpoint(checkpoint_path, inner, optimizer, scheduler, step, time.perf_counter() - start,
                             vocab_ids, config, digest, scaling)
        bar.set_postfix(loss=f"{smoothed:.3f}", beta16="-" if proxy is None else f"{proxy:.2f}")
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - start
    summary = {}
    if accelerator.is_main_process:
        curves = final_curves(inner, model, heldout[:config.final_eval_samples], config.max_length)
        if stopped_early:
            _save_checkpoint(checkpoint_path, inner, optimizer, scheduler, step, time.perf_counter() - start,
                             vocab_ids, config, digest, scaling)
        summary = {"steps": step, "planned_steps": total_steps, "train_seconds": round(seconds, 1),
                   "train_samples": len(train_set),
                   "heldout_samples": len(heldout), "train_tokens": sum(len(s["ids"]) for s in train_set),
                   "device": str(device), "processes": world, "data": [str(d) for d in data_dirs],
                   "data_digest": digest, **scaling,
                   "final_loss": None if smoothed is None else round(smoothed, 4), "config": asdict(config)}
        if init is not None:
            summary["warm_start"] = warm_start_record(config.init_from, init[0])
        save_drafter(out_dir, inner, drafter_base(model),
                     {"training": summary, "acceptance_curve": {t: {str(b): a for b, a in c.items()}
                                                                for t, c in curves.items()}})
        summary["acceptance_curve"] = curves
    accelerator.wait_for_everyone()
    return summary


def process_share(batch: list[int], rank: int, world: int) -> list[int]:
    """The sample positions of `batch` process `rank` of `world` trains on (at least one, so every process steps)."""
    return batch[rank::world] or batch[:1]


def planned_samples(train_set: list[dict], config: TrainConfig, steps_per_epoch: int, first: int, last: int,
                    rank: int, world: int) -> list[dict]:
    """The samples process `rank` reads in steps first .. last - 1 (batches are a pure function of seed and epoch),
    each once: what a run of fewer steps than the data, or a resumed one, needs in the hidden-state cache."""
    picked = {}
    for epoch in range(first // steps_per_epoch, -(-last // steps_per_epoch)):
        batches = batch_order(train_set, config.batch_size, config.seed, epoch)
        offset = epoch * steps_per_epoch
        for batch in batches[max(first - offset, 0):last - offset]:
            picked.update(dict.fromkeys(process_share(batch, rank, world)))
    return [train_set[i] for i in picked]


def _out_of_time(accelerator, here: bool) -> bool:
    """Whether any process is past the time limit: all stop at the same step, or the others would wait for
    its gradients forever."""
    flag = torch.tensor(float(here), device=accelerator.device)
    return bool(accelerator.reduce(flag, "max").item())


def warm_start_config(config: TrainConfig, saved_draft) -> TrainConfig:
    """The options left to their defaults settled: a warm start keeps the saved drafter's MLP width, slot attention
    and feature layers unless asked for others (--intermediate-size 0, an empty --slot-attention or --feature-layers
    mean the kind's default, or the warm start's); slots attend bidirectionally by default."""
    if saved_draft is None:
        return replace(config, slot_attention=config.slot_attention or "bidirectional")
    saved_layers = ",".join(map(str, getattr(saved_draft, "feature_layers", ())))
    return replace(config, intermediate_size=config.intermediate_size or saved_draft.intermediate_size,
                   slot_attention=config.slot_attention or getattr(saved_draft, "slot_attention", "bidirectional"),
                   feature_layers=config.feature_layers or saved_layers)


def _check_same_shape(init_from: str, saved, wanted) -> None:
    """A warm start needs the saved drafter's parameter shapes (not its loss weights or slot attention; feature layers
    may be added to a drafter without them); name every option that differs."""
    grows = [name for name in WARM_START_GROWS if not getattr(saved, name, None)]
    differing = [f"{name} {getattr(saved, name)!r} (these options give {getattr(wanted, name)!r})"
                 for name in saved.to_dict()
                 if name not in (*WARM_START_FREE, *grows) and getattr(saved, name) != getattr(wanted, name)]
    if not differing:
        return
    raise CtcspecError(f"--init-from {init_from}: the saved drafter has " + ", ".join(differing) +
                       "; give the options it was trained with")


def warm_start_record(init_from: str, saved_config: dict) -> dict:
    """Where a warm-started drafter began, and the steps and tokens behind it over every earlier round."""
    earlier = saved_config.get("training") if isinstance(saved_config.get("training"), dict) else {}
    before = earlier.get("warm_start") if isinstance(earlier.get("warm_start"), dict) else {}
    return {"from": init_from, "rounds": before.get("rounds", 1) + 1 if before else 2,
            "earlier_steps": before.get("earlier_steps", 0) + earlier.get("steps", 0),
            "earlier_train_tokens": before.get("earlier_train_tokens", 0) + earlier.get("train_tokens", 0)}


def final_curves(module, model, heldout: list[dict], max_length: int) -> dict[str, dict[int, float]]:
    """The held-out acceptance curve of each of the module's search modes, saved with the drafter. A module
    that searches step by step pays a forward per node: 16 anchors per sequence and budgets up to 32 keep it quick."""
    if not module.sequential_search:
        return {mode: acceptance_curve(module, model, heldout, mode, max_length=max_length)
                for mode in module.search_modes}
    return {mode: acceptance_curve(module, model, heldout, mode, budgets=SEARCH_BUDGETS, max_anchors=16,
                                   max_length=max_length) for mode in module.search_modes}


def _save_checkpoint(path: Path, module, optimizer, scheduler, step: int, elapsed: float, vocab_ids,
                     config: TrainConfig, digest: str, scaling: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"module": module.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": step, "elapsed_s": elapsed,
                "vocab_ids": vocab_ids, "train_config": asdict(config), "data_digest": digest,
                "scaling": scaling}, tmp)
    tmp.replace(path)  # atomic: a kill mid-write leaves the previous checkpoint intact


def summary_json(summary: dict) -> str:
    return json.dumps(summary, indent=2, default=str)
