"""Training a draft module on distilled data (self-distillation): the CTC module, or a baseline
(Medusa, Hydra, EAGLE-style) with the same data, anchors and loop; each module computes its own loss.

Each batch: the frozen base model runs the distilled sequences once (teacher forcing) for its last
hidden states; at a random subset of answer positions t ("anchors") the module's N slots must
spell out the base model's next K tokens x_{t+2} .. x_{t+1+K} (x_{t+1} is the root, already known)
under CTC loss. Tokens outside the draft vocabulary become the "other" class, which ends a draft.

Checkpoints (module, optimizer, schedule, step) are written atomically every `checkpoint_every`
steps; `resume=True` continues from the last one. Batches are a pure function of (seed, step), so a
resumed run sees the same data a straight run would. Runs unchanged under `accelerate launch`:
every process takes its share of each batch, gradients are averaged by accelerate.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ctcspec.checkpoint import build_module, describe_base, save_drafter
from ctcspec.ctc_transform import TRANSFORMS, accepted_by_budget, transform_nodes
from ctcspec.distill import read_samples
from ctcspec.draft_heads import HEAD_KINDS, HeadsConfig
from ctcspec.draft_module import CTCDraftModule, DraftConfig
from ctcspec.errors import CtcspecError

BUDGETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
SEARCH_BUDGETS = BUDGETS[:10]  # sequential drafters pay a forward per node: their curves stop at 32 nodes
CHECKPOINT = "checkpoint.pt"
RESUMABLE_CHANGES = frozenset({"time_limit_s", "eval_every", "eval_samples", "final_eval_samples", "checkpoint_every",
                               "hidden_cache"})


@dataclass
class TrainConfig:
    kind: str = "ctc"                # ctc | medusa | hydra | eagle (the baselines share data and loop)
    num_slots: int = 6               # defaults: the shipped SmolLM2 drafter's recipe (docs/ctc.md)
    target_tokens: int = 4           # ctc: K tokens per alignment; medusa/hydra: heads; eagle: draft depth
    intermediate_size: int = 0       # MLP width; 0 = the kind's default (ctc/eagle: the base model's; heads 1024)
    slot_attention: str = "bidirectional"
    loss: str = "ctc"
    draft_vocab: int = 8192          # most frequent answer tokens; 0 = the whole vocabulary
    steps: int = 0                   # optimizer steps; 0 = `epochs` passes over the data
    epochs: float = 2.0
    batch_size: int = 32             # sequences per step
    anchors_per_sequence: int = 64   # drafts per sequence per step (position subsampling)
    max_length: int = 1024
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: float = 0.05
    heldout_every: int = 50          # every 50th sample (by index) is held out
    eval_every: int = 100
    eval_samples: int = 16           # held-out samples for the progress bar's acceptance proxy
    final_eval_samples: int = 64     # held-out samples for the saved acceptance curves
    checkpoint_every: int = 200
    seed: int = 0
    time_limit_s: float = 0.0        # stop early (and still save the drafter) after this long; 0 = no limit
    max_train_samples: int = 0       # train on a seeded random subset of this many sequences; 0 = all
    hidden_cache: str = ""           # directory caching base hidden states (fp16) per sequence, shared by runs


def draft_vocabulary(samples: list[dict], size: int, vocab_size: int) -> torch.Tensor:
    """The `size` most frequent answer tokens (all tokens when size is 0 or covers the vocabulary)."""
    if size <= 0 or size >= vocab_size:
        return torch.arange(vocab_size)
    counts = Counter(t for s in samples for t in s["ids"][s["prompt_len"]:])
    ids = [t for t, _ in counts.most_common(size)]
    filler = (t for t in range(vocab_size) if t not in set(ids))
    ids += [next(filler) for _ in range(size - len(ids))]  # tiny data: pad with unseen ids
    return torch.tensor(sorted(ids))


def split_heldout(samples: list[dict], every: int) -> tuple[list[dict], list[dict]]:
    heldout = [s for s in samples if s["index"] % every == 0]
    train = [s for s in samples if s["index"] % every != 0]
    if not train or not heldout:
        raise CtcspecError(f"need more distilled samples: {len(samples)} give no train/held-out split")
    return train, heldout


def batch_order(samples: list[dict], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch's batches (sample positions): shuffled, similar lengths grouped to limit padding."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(samples)))
    rng.shuffle(order)
    chunk = batch_size * 32
    batches = []
    for start in range(0, len(order), chunk):
        group = sorted(order[start:start + chunk], key=lambda i: len(samples[i]["ids"]))
        batches += [group[i:i + batch_size] for i in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    return batches


def pad_batch(samples: list[dict], max_length: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    seqs = [s["ids"][:max_length] for s in samples]
    width = max(len(s) for s in seqs)
    tokens = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = torch.tensor(s)
    lengths = torch.tensor([len(s) for s in seqs])
    prompt_lens = torch.tensor([min(s["prompt_len"], max_length) for s in samples])
    return tokens.to(device), lengths.to(device), prompt_lens.to(device)


def choose_anchors(lengths: torch.Tensor, prompt_lens: torch.Tensor, count: int,
                   generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchors t in [prompt_len - 1, length - 3] (root and at least one target inside the sequence).
    Returns anchors (batch, count) and a validity mask; count=0 takes every valid position."""
    rows = []
    for length, prompt_len in zip(lengths.tolist(), prompt_lens.tolist(), strict=True):
        positions = list(range(max(prompt_len - 1, 0), length - 2))
        if count and len(positions) > count:
            picks = torch.randperm(len(positions), generator=generator)[:count].tolist()
            positions = sorted(positions[i] for i in picks)
        rows.append(positions)
    width = max(1, max(len(r) for r in rows))
    anchors = torch.zeros(len(rows), width, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        anchors[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        valid[i, :len(r)] = True
    return anchors.to(lengths.device), valid.to(lengths.device)


def draft_targets(module, tokens: torch.Tensor, lengths: torch.Tensor, anchors: torch.Tensor,
                  valid: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class ids of x_{t+2} .. x_{t+1+count} per anchor, cut at the sequence end and after the first
    token outside the draft vocabulary (kept as "other"). Returns (batch, S, count) and lengths."""
    offsets = torch.arange(2, 2 + count, device=tokens.device)
    positions = anchors[..., None] + offsets                       # (b, S, count)
    inside = positions < lengths[:, None, None]
    gathered = tokens.gather(1, positions.clamp(max=tokens.shape[1] - 1).flatten(1)).view(positions.shape)
    classes = module.class_of_token[gathered]
    is_other = (classes == module.config.other_id) & inside
    after_other = (is_other.cumsum(-1) - is_other.long()) > 0    # strictly after the first "other"
    keep = inside & ~after_other & valid[..., None]
    target_lengths = keep.sum(-1)
    return classes.masked_fill(~keep, 0), target_lengths


@torch.no_grad()
def base_hidden(model, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    mask = (torch.arange(tokens.shape[1], device=tokens.device) < lengths[:, None]).long()
    out = model(input_ids=tokens, attention_mask=mask, output_hidden_states=True, use_cache=False)
    return out.hidden_states[-1]


def _ids_key(ids: list[int]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:24]


def open_hidden_cache(path: Path, model) -> Path:
    """The hidden-state cache directory, bound to one base model (its description is stored there)."""
    path.mkdir(parents=True, exist_ok=True)
    meta, base = path / "base.json", {**describe_base(model), "dtype": str(model.dtype)}
    if meta.exists():
        if json.loads(meta.read_text()) != base:
            raise CtcspecError(f"hidden-state cache {str(path)!r} was written for another base model or dtype")
    else:
        meta.write_text(json.dumps(base, indent=2) + "\n")
    return path


@torch.no_grad()
def batch_hidden(model, samples: list[dict], tokens: torch.Tensor, lengths: torch.Tensor,
                 cache_dir: Path | None) -> torch.Tensor:
    """Base hidden states of a padded batch; with `cache_dir`, each sequence's states are computed
    once and kept on disk (fp16), so several drafters trained on the same data pay the base forward once."""
    if cache_dir is None:
        return base_hidden(model, tokens, lengths)
    import numpy as np

    paths = [cache_dir / f"{_ids_key(s['ids'][:int(n)])}.npy" for s, n in zip(samples, lengths.tolist(), strict=True)]
    missing = [i for i, p in enumerate(paths) if not p.exists()]
    if missing:
        rows = torch.tensor(missing, device=tokens.device)
        computed = base_hidden(model, tokens[rows], lengths[rows]).to("cpu", torch.float16)
        for row, i in enumerate(missing):
            tmp = paths[i].with_suffix(".tmp.npy")
            np.save(tmp, computed[row, :int(lengths[i])].numpy())
            tmp.replace(paths[i])  # atomic: a killed run never leaves half a file behind
    hidden = torch.zeros(*tokens.shape, model.config.hidden_size, dtype=model.dtype)
    for i, p in enumerate(paths):
        states = torch.from_numpy(np.load(p))
        hidden[i, :states.shape[0]] = states.to(hidden.dtype)
    return hidden.to(tokens.device)


@torch.no_grad()
def acceptance_curve(module, model, samples: list[dict], transform: str = "beam",
                     budgets=BUDGETS, max_anchors: int = 48, top_k: int = 6, beam_width: int = 16,
                     max_length: int = 1024, seed: int = 0) -> dict[int, float]:
    """Mean draft tokens the base model would accept, per tree budget, on held-out distilled sequences.

    Exact for those positions: the distilled answers are the base model's greedy output, so its
    hidden states there are what decoding would hand the drafter. `transform` applies to the CTC
    module; the baselines are searched best first as at inference.
    """
    was_training = module.training
    module.eval()
    other = module.config.other_id
    depth = module.config.num_slots if isinstance(module, CTCDraftModule) else module.config.depth
    totals, drafts = [0] * len(budgets), 0
    generator = torch.Generator().manual_seed(seed)
    device = module.embed_weight.device
    for sample in samples:
        tokens, lengths, prompt_lens = pad_batch([sample], max_length, device)
        anchors, valid = choose_anchors(lengths.cpu(), prompt_lens.cpu(), max_anchors, generator)
        anchors, valid = anchors.to(device), valid.to(device)
        hidden = base_hidden(model, tokens, lengths)
        truth, truth_lengths = draft_targets(module, tokens, lengths, anchors, valid, depth)
        kept = [a for a in range(anchors.shape[1]) if bool(valid[0, a])]
        ranked = ranked_drafts(module, hidden, tokens, [int(anchors[0, a]) for a in kept], transform, top_k,
                               beam_width, max(budgets))
        for a, nodes in zip(kept, ranked, strict=True):
            target = [t for t in truth[0, a, :int(truth_lengths[0, a])].tolist() if t != other]
            totals = [x + y for x, y in zip(totals, accepted_by_budget(nodes, target, budgets), strict=True)]
            drafts += 1
    module.train(was_training)
    return {b: total / max(drafts, 1) for b, total in zip(budgets, totals, strict=True)}


def ranked_drafts(module, hidden: torch.Tensor, tokens: torch.Tensor, anchors: list[int], transform: str,
                  top_k: int, beam_width: int, max_nodes: int) -> list[list[tuple[int, ...]]]:
    """Per anchor, the ranked draft nodes the drafter would offer there (as at inference)."""
    if not anchors:
        return []
    if isinstance(module, CTCDraftModule):
        c = module.config
        log_probs = module.training_logits(hidden, tokens, torch.tensor([anchors], device=tokens.device))
        log_probs = log_probs.float().log_softmax(-1)[0].cpu()
        return [transform_nodes(lp, transform, top_k, beam_width, c.blank_id, c.other_id, max_nodes)
                for lp in log_probs]
    from ctcspec.drafters.heads import search_nodes

    contexts = module.offline_contexts(hidden.to(module.embed_weight.dtype), tokens, anchors)
    return [search_nodes(module, context, max_nodes, module.config.depth) for context in contexts]


def _lr_factor(step: int, total: int, warmup: float) -> float:
    warm = max(1, int(total * warmup))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def read_data(data_dirs: list[Path]) -> list[dict]:
    """Samples of several distilled directories; indices offset per directory so they stay distinct."""
    samples, seen = [], set()
    for k, directory in enumerate(data_dirs):
        for s in read_samples(Path(directory)):
            prompt = tuple(s["ids"][:s["prompt_len"]])
            if prompt not in seen:  # the same prompt in two directories: keep one (no held-out leaks)
                seen.add(prompt)
                samples.append({**s, "index": s["index"] + k * 10_000_000})
    return samples


def module_config(config: TrainConfig, model, draft_vocab_size: int) -> DraftConfig | HeadsConfig:
    """The drafter module's architecture for this base model and training configuration."""
    hidden_size = model.config.hidden_size
    base_inner = getattr(model.config, "intermediate_size", 4 * hidden_size)
    if config.kind == "ctc":
        return DraftConfig(hidden_size=hidden_size, num_heads=model.config.num_attention_heads,
                           intermediate_size=config.intermediate_size or base_inner,
                           draft_vocab_size=draft_vocab_size, num_slots=config.num_slots,
                           target_tokens=config.target_tokens, slot_attention=config.slot_attention,
                           loss=config.loss)
    if config.kind not in HEAD_KINDS:
        raise CtcspecError(f"unknown drafter kind {config.kind!r}; choose from: ctc, {', '.join(HEAD_KINDS)}")
    inner = config.intermediate_size or (base_inner if config.kind == "eagle" else 1024)
    return HeadsConfig(kind=config.kind, hidden_size=hidden_size, draft_vocab_size=draft_vocab_size,
                       depth=config.target_tokens, intermediate_size=inner,
                       num_heads=model.config.num_attention_heads)


def train(model, data_dirs: list[Path], out_dir: Path, config: TrainConfig, resume: bool = False,
          progress: bool = True) -> dict:
    """Train a CTC drafter for `model` on the distilled samples of `data_dirs`; writes it to `out_dir`."""
    from accelerate import Accelerator

    out_dir = Path(out_dir)
    accelerator = Accelerator(cpu=model.device.type == "cpu")
    device = accelerator.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    model = model.to(device).eval()
    model.requires_grad_(False)
    samples = read_data([Path(d) for d in data_dirs])
    train_set, heldout = split_heldout(samples, config.heldout_every)
    checkpoint_path = out_dir / CHECKPOINT
    state = None
    if resume:
        if not checkpoint_path.exists():
            raise CtcspecError(f"--resume: no checkpoint at {checkpoint_path}")
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        changed = sorted(k for k, v in asdict(config).items()
                         if k not in RESUMABLE_CHANGES and state["train_config"].get(k) != v)
        if changed:
            raise CtcspecError(f"--resume with different training options ({', '.join(changed)}); "
                               "use the original options or a new --out")
        vocab_ids = state["vocab_ids"]
    else:
        vocab_ids = draft_vocabulary(train_set, config.draft_vocab, model.get_output_embeddings().weight.shape[0])
    cache_dir = open_hidden_cache(Path(config.hidden_cache), model) if config.hidden_cache else None
    if config.max_train_samples and config.max_train_samples < len(train_set):
        picks = sorted(random.Random(config.seed).sample(range(len(train_set)), config.max_train_samples))
        train_set = [train_set[i] for i in picks]  # after the vocabulary, which always sees all the data
    draft_config = module_config(config, model, len(vocab_ids))
    torch.manual_seed(config.seed)
    module = build_module(draft_config, vocab_ids, model).to(device)
    optimizer = torch.optim.AdamW(module.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train_set) / config.batch_size)
    total_steps = config.steps or max(1, int(config.epochs * steps_per_epoch))
    step, elapsed = 0, 0.0
    if state is not None:
        module.load_state_dict(state["module"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state["elapsed_s"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, total_steps, config.warmup),
                                                  last_epoch=step - 1 if step else -1)
    if state is not None:
        scheduler.load_state_dict(state["scheduler"])
    module, optimizer = accelerator.prepare(module, optimizer)
    inner = accelerator.unwrap_model(module)
    rank, world = accelerator.process_index, accelerator.num_processes
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step",
               disable=not (progress and accelerator.is_main_process))
    smoothed, proxy = None, None
    start = time.perf_counter() - elapsed
    tokens_seen = 0
    stopped_early = False
    while step < total_steps:
        if config.time_limit_s and time.perf_counter() - start > config.time_limit_s:
            stopped_early = True
            break
        epoch, index = divmod(step, steps_per_epoch)
        batches = batch_order(train_set, config.batch_size, config.seed, epoch)
        if index >= len(batches):
            step += 1
            continue
        share = batches[index][rank::world] or batches[index][:1]
        tokens, lengths, prompt_lens = pad_batch([train_set[i] for i in share], config.max_length, device)
        generator = torch.Generator().manual_seed(config.seed * 7919 + step)
        anchors, valid = choose_anchors(lengths.cpu(), prompt_lens.cpu(), config.anchors_per_sequence, generator)
        anchors, valid = anchors.to(device), valid.to(device)
        hidden = batch_hidden(model, [train_set[i] for i in share], tokens, lengths, cache_dir)
        targets, target_lengths = draft_targets(inner, tokens, lengths, anchors, valid, inner.target_count)
        loss = module(hidden, tokens, anchors, targets, target_lengths)  # through the wrapper: accelerate syncs
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += int(lengths.sum())
        value = loss.item()
        smoothed = value if smoothed is None else 0.95 * smoothed + 0.05 * value
        if accelerator.is_main_process and (step % config.eval_every == 0 or step == total_steps):
            curve = acceptance_curve(inner, model, heldout[:config.eval_samples], budgets=(16,),
                                     max_length=config.max_length)
            proxy = 1 + curve[16]
        if accelerator.is_main_process and (step % config.checkpoint_every == 0 or step == total_steps):
            _save_checkpoint(checkpoint_path, inner, optimizer, scheduler, step, time.perf_counter() - start,
                             vocab_ids, config)
        bar.set_postfix(loss=f"{smoothed:.3f}", beta16="-" if proxy is None else f"{proxy:.2f}")
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - start
    summary = {}
    if accelerator.is_main_process:
        if config.kind == "ctc":
            curves = {t: acceptance_curve(inner, model, heldout[:config.final_eval_samples], transform=t,
                                          max_length=config.max_length) for t in TRANSFORMS}
        else:  # 16 anchors per sequence: a best-first search of 32 nodes costs ~60 ms on a CPU
            curves = {"search": acceptance_curve(inner, model, heldout[:config.final_eval_samples],
                                                 budgets=SEARCH_BUDGETS, max_anchors=16, max_length=config.max_length)}
        if stopped_early:
            _save_checkpoint(checkpoint_path, inner, optimizer, scheduler, step, time.perf_counter() - start,
                             vocab_ids, config)
        summary = {"steps": step, "planned_steps": total_steps, "train_seconds": round(seconds, 1),
                   "train_samples": len(train_set),
                   "heldout_samples": len(heldout), "train_tokens": sum(len(s["ids"]) for s in train_set),
                   "device": str(device), "processes": world, "data": [str(d) for d in data_dirs],
                   "config": asdict(config)}
        save_drafter(out_dir, inner, describe_base(model),
                     {"training": summary, "acceptance_curve": {t: {str(b): a for b, a in c.items()}
                                                                for t, c in curves.items()}})
        summary["acceptance_curve"] = curves
    accelerator.wait_for_everyone()
    return summary


def _save_checkpoint(path: Path, module, optimizer, scheduler, step: int, elapsed: float, vocab_ids,
                     config: TrainConfig) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"module": module.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": step, "elapsed_s": elapsed,
                "vocab_ids": vocab_ids, "train_config": asdict(config)}, tmp)
    tmp.replace(path)  # atomic: a kill mid-write leaves the previous checkpoint intact


def summary_json(summary: dict) -> str:
    return json.dumps(summary, indent=2, default=str)
