"""Training data: distilled samples (directories and data stores), the held-out split, batches, anchors, CTC
targets, and the base model's hidden states (computed per batch, or once into an on-disk cache shared by several
runs; the last layer's and any earlier layers a drafter reads).

Batches are a pure function of (seed, epoch) and the data, so a resumed run on the same data (`data_digest`, which
a resume checks) sees the batches a straight run would.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ctcspec.errors import CtcspecError
from ctcspec.modules.files import describe_base, same_weights
from ctcspec.training.distill import META_FILE, read_samples
from ctcspec.training.store import is_store, read_manifest, read_store


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


def anchor_generator(seed: int, step: int, index: int) -> torch.Generator:
    """The random source of one sample's anchors at one training step: the same whichever process,
    batch position or share of the batch the sample lands in."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_000_000_007 + index) % (1 << 63))


def choose_anchors(lengths: torch.Tensor, prompt_lens: torch.Tensor, count: int,
                   generators: Sequence[torch.Generator | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchors t in [prompt_len - 1, length - 3] (root and at least one target inside the sequence), drawn
    with one generator per row. Returns anchors (batch, count) and a validity mask; count=0 takes every
    valid position."""
    rows = []
    for length, prompt_len, generator in zip(lengths.tolist(), prompt_lens.tolist(), generators, strict=True):
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
def base_hidden(model, tokens: torch.Tensor, lengths: torch.Tensor, feature_layers: Sequence[int] = ()) -> torch.Tensor:
    """The base model's last (normed) hidden states of a padded batch, then those of `feature_layers` (HF
    hidden_states indices), concatenated on the last dimension: what a drafter reading those layers gets. The decoder
    alone runs: the LM head's logits of every position (a fifth of SmolLM2's forward) are not needed."""
    mask = (torch.arange(tokens.shape[1], device=tokens.device) < lengths[:, None]).long()
    out = model.get_decoder()(input_ids=tokens, attention_mask=mask, output_hidden_states=True, use_cache=False)
    return torch.cat([out.hidden_states[-1], *(out.hidden_states[i] for i in feature_layers)], dim=-1)


def check_feature_layers(feature_layers: Sequence[int], model) -> None:
    """Feature layers name base layers before the last (whose states every drafter reads anyway)."""
    last = model.config.num_hidden_layers if feature_layers else 0
    if any(not 0 <= i < last for i in feature_layers):
        raise CtcspecError(f"--feature-layers: the base model's layers are 0 (embeddings) .. {last - 1} beside the "
                           f"last; got {', '.join(map(str, feature_layers))}")


def _ids_key(ids: list[int]) -> str:
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:24]


def _cache_files(cache_dir: Path, ids: list[int], feature_layers: Sequence[int]) -> list[Path]:
    """One sequence's cached states: the last layer's (the cache's first format), then each feature layer's."""
    key = _ids_key(ids)
    return [cache_dir / f"{key}{suffix}.npy" for suffix in ("", *(f".layer{i}" for i in feature_layers))]


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
def _store_missing(model, paths: list[list[Path]], tokens: torch.Tensor, lengths: torch.Tensor,
                   feature_layers: Sequence[int]) -> int:
    """Run the base model on the rows of a padded batch whose cache files are missing and write them (fp16, a file
    per layer, each atomically: a killed run never leaves half a file). Returns how many rows it ran."""
    missing = [i for i, row in enumerate(paths) if not all(p.exists() for p in row)]
    if not missing:
        return 0
    rows = torch.tensor(missing, device=tokens.device)
    d = model.config.hidden_size
    computed = base_hidden(model, tokens[rows], lengths[rows], feature_layers).float()
    earlier = computed[..., d:].unflatten(-1, (-1, d))
    earlier = earlier * torch.rsqrt(earlier.pow(2).mean(-1, keepdim=True).clamp(min=1e-12))
    computed = torch.cat([computed[..., :d], earlier.flatten(-2)], dim=-1).to("cpu", torch.float16)
    for row, i in enumerate(missing):
        for part, path in enumerate(paths[i]):
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")  # one per process: processes may share a sequence
            np.save(tmp, computed[row, :int(lengths[i]), part * d:(part + 1) * d].numpy())
            tmp.replace(path)
    return len(missing)


def batch_hidden(model, samples: list[dict], tokens: torch.Tensor, lengths: torch.Tensor,
                 cache_dir: Path | None, feature_layers: Sequence[int] = ()) -> torch.Tensor:
    """`base_hidden` of a padded batch; with `cache_dir`, each sequence's states of each layer are computed
    once and kept on disk (fp16, a file per layer), so drafters trained on the same data pay the base forward once,
    whichever layers they read. Earlier layers are kept divided by their root mean square: their raw residual
    states can pass fp16's range (SmolLM2's reach 22,000 of its 65,504), and the module RMS-normalises them anyway."""
    if cache_dir is None:
        return base_hidden(model, tokens, lengths, feature_layers)
    paths = [_cache_files(cache_dir, s["ids"][:int(n)], feature_layers)
             for s, n in zip(samples, lengths.tolist(), strict=True)]
    _store_missing(model, paths, tokens, lengths, feature_layers)
    width = model.config.hidden_size * (1 + len(feature_layers))
    hidden = torch.zeros(*tokens.shape, width, dtype=model.dtype)
    for i, row in enumerate(paths):
        states = torch.cat([torch.from_numpy(np.load(p)) for p in row], dim=-1)
        hidden[i, :states.shape[0]] = states.to(hidden.dtype)
    return hidden.to(tokens.device)


def fill_hidden_cache(model, samples: list[dict], cache_dir: Path, max_length: int,
                      feature_layers: Sequence[int] = (), batch_tokens: int = 8192, deadline: float | None = None,
                      progress: bool = False) -> int:
    """Write the cache files `batch_hidden` would lack for `samples`, shortest first, in batches of at most
    `batch_tokens` padded tokens (one longer sequence alone): the base model runs once per sequence at a batch size
    larger than training's, and the training steps after it only read. Stops starting batches once
    `time.perf_counter()` passes `deadline`. Returns how many sequences it ran; a killed fill resumes where it
    stopped."""
    missing = [s for s in samples
               if not all(p.exists() for p in _cache_files(cache_dir, s["ids"][:max_length], feature_layers))]
    missing.sort(key=lambda s: min(len(s["ids"]), max_length))
    groups, group = [], []
    for sample in missing:
        if group and (len(group) + 1) * min(len(sample["ids"]), max_length) > batch_tokens:
            groups.append(group)
            group = []
        group.append(sample)
    groups += [group] if group else []
    ran = 0
    for group in tqdm(groups, desc="hidden-state cache", unit="batch", disable=not (progress and groups)):
        if deadline is not None and time.perf_counter() > deadline:
            break
        tokens, lengths, _ = pad_batch(group, max_length, model.device)
        paths = [_cache_files(cache_dir, s["ids"][:max_length], feature_layers) for s in group]
        ran += _store_missing(model, paths, tokens, lengths, feature_layers)
    return ran


def read_data(data_dirs: list[Path]) -> list[dict]:
    """Samples of several data stores and distilled directories, stores first. A store's indices are hashes of the
    prompts; a directory's are its positions, offset per directory so they stay distinct. The same prompt twice:
    the first is kept, so within one run a prompt is held out or trained on, never both, and a store's split
    wins over a directory's."""
    samples, seen = [], set()
    ordered = sorted(enumerate(map(Path, data_dirs)), key=lambda item: not is_store(item[1]))
    for k, directory in ordered:
        group = read_store(directory) if is_store(directory) else [
            {**s, "index": s["index"] + k * 10_000_000} for s in read_samples(directory)]
        for s in group:
            prompt = tuple(s["ids"][:s["prompt_len"]])
            if prompt not in seen:
                seen.add(prompt)
                samples.append(s)
    return samples


def data_digest(samples: list[dict]) -> str:
    """What identifies a training set: its samples' indices and lengths, in order (16 hex digits of a sha256)."""
    return hashlib.sha256(json.dumps([(s["index"], len(s["ids"])) for s in samples]).encode()).hexdigest()[:16]


def check_data_base(data_dirs: list[Path], model) -> None:
    """Every store and distilled directory that records its base model was distilled from `model` (an LM head
    fingerprint in common), or the error names it. A base recorded in one precision without rounded fingerprints
    (fp32 data from before they were recorded, or bf16/fp16-distilled data) cannot be checked against a model
    loaded in bf16/fp16, and passes."""
    for directory in data_dirs:
        if is_store(directory):
            base = read_manifest(directory)["base"]
        else:
            try:
                base = json.loads((Path(directory) / META_FILE).read_text())["base"]
            except (OSError, ValueError, KeyError, TypeError):
                continue  # read_samples names what is missing; older directories may lack their metadata
        unverifiable = "lm_head_sha256_rounded" not in base and next(model.parameters()).dtype != torch.float32 \
            if isinstance(base, dict) else True
        if not unverifiable and not same_weights(base, model):
            raise CtcspecError(f"{str(directory)!r} was distilled from another base model "
                               f"({base.get('architecture')}); train and evaluate on data of this model")
