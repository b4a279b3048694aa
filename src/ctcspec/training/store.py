"""The distilled-data store: every distillation run's token ids, kept in git in compact form, so a later run on
any machine continues from all the data so far (issue 25; docs/ctc.md "The data store").

A store is a directory: `manifest.json` lists its shards in the order they were added, and each shard
`NNNN-<name>.jsonl.xz` holds one run's samples, a JSON line each ({"source", "prompt_len", "ids"}), xz-compressed.
Invariants: a prompt (its token ids) is in the store at most once; every shard's sha256 is the one the manifest
records; every shard was distilled from the base model the manifest names. A sample's index, which decides the
held-out split (`index % heldout_every == 0`) and its training anchors, is a hash of its prompt ids: the same
prompt is held out, or not, in every store and on every machine, whatever order the shards came in. (A distill
directory's samples are split by their position instead: a drafter trained on a directory may have trained on
the store's held-out answers to the same prompts; `read_data` reads stores first, so within one run the store's
split wins.) Hidden-state caches never go in a store. One writer at a time: two `ctcspec store` runs on one store
at once could number their shards alike.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import re
import time
from collections.abc import Callable
from pathlib import Path

from ctcspec.errors import CtcspecError, read_text_file
from ctcspec.modules.files import fingerprints
from ctcspec.training.distill import META_FILE, read_runs, read_samples

MANIFEST = "manifest.json"
STORE_FORMAT = 1
DEFAULT_MAX_MB = 30.0  # the repository's budget for distilled data (issue 25); past it, data lives elsewhere


SHARD_NAME = re.compile(r"\d{4}-[A-Za-z0-9._-]+\.jsonl\.xz")  # inside the store, never a path elsewhere
SHARD_KEYS = {"file": str, "sha256": str, "bytes": int, "samples": int, "tokens": int, "answer_tokens": int,
              "sources": dict}


def is_store(path: Path) -> bool:
    """Whether `path` is a data store (holds a manifest)."""
    return (Path(path) / MANIFEST).is_file()


def prompt_index(prompt_ids: list[int]) -> int:
    """A sample's index in a store: 48 bits of the sha256 of its prompt ids."""
    return int(hashlib.sha256(json.dumps(prompt_ids).encode()).hexdigest()[:12], 16)


def read_manifest(store: Path) -> dict:
    """The store's manifest, checked for its shape; an absent store reads as empty."""
    path = Path(store) / MANIFEST
    if not path.exists():
        return {"format": STORE_FORMAT, "base": None, "shards": []}
    try:
        manifest = json.loads(read_text_file(path, "data store manifest"))
    except json.JSONDecodeError as exc:
        raise CtcspecError(f"data store manifest {str(path)!r} is not valid JSON ({exc.msg})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != STORE_FORMAT \
            or not isinstance(manifest.get("shards"), list):
        raise CtcspecError(f"{str(path)!r} is not a ctcspec data store manifest (format {STORE_FORMAT})")
    base = manifest.get("base")
    if not (isinstance(base, dict) and isinstance(base.get("lm_head_sha256"), str)) \
            and not (base is None and not manifest["shards"]):
        raise CtcspecError(f"data store manifest {str(path)!r} names no base model (its \"base\")")
    for number, shard in enumerate(manifest["shards"]):
        bad = [key for key, kind in SHARD_KEYS.items() if not isinstance(shard, dict) or not isinstance(shard.get(key),
                                                                                                     kind)]
        if not bad and not SHARD_NAME.fullmatch(shard["file"]):
            bad = ["file name"]
        if not bad and not all(isinstance(c, dict) and all(isinstance(c.get(k), int) for k in ("samples",
                                                                                              "answer_tokens"))
                               for c in shard["sources"].values()):
            bad = ["sources"]
        if bad:
            raise CtcspecError(f"data store manifest {str(path)!r}: shard {number} lacks a valid {', '.join(bad)}")
    return manifest


def _shard_lines(store: Path, shard: dict) -> list[str]:
    """A shard's JSON lines, after checking its sha256 against the manifest's."""
    path = Path(store) / shard["file"]
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CtcspecError(f"data store shard {str(path)!r} cannot be read ({exc.strerror or exc})") from None
    if hashlib.sha256(data).hexdigest() != shard.get("sha256"):
        raise CtcspecError(f"data store shard {str(path)!r} does not match the sha256 its manifest records")
    try:
        return lzma.decompress(data).decode("utf-8").splitlines()
    except (lzma.LZMAError, UnicodeDecodeError):
        raise CtcspecError(f"data store shard {str(path)!r} is not xz-compressed UTF-8 text") from None


def read_store(store: Path) -> list[dict]:
    """Every sample of the store, shard by shard: {"index", "source", "prompt_len", "ids", "shard"}."""
    store = Path(store)
    samples = []
    for shard in read_manifest(store)["shards"]:
        for lineno, line in enumerate(_shard_lines(store, shard), start=1):
            try:
                record = json.loads(line)
                ids, prompt_len = [int(t) for t in record["ids"]], int(record["prompt_len"])
            except (ValueError, KeyError, TypeError):
                raise CtcspecError(f"data store shard {shard['file']!r} line {lineno} is corrupt") from None
            samples.append({"index": prompt_index(ids[:prompt_len]), "source": str(record.get("source", "")),
                            "prompt_len": prompt_len, "ids": ids, "shard": shard["file"]})
    return samples


def store_prompts(store: Path) -> set[tuple[int, ...]]:
    """The prompts (token ids) the store already holds answers to."""
    return {tuple(s["ids"][:s["prompt_len"]]) for s in read_store(store)} if is_store(store) else set()


def add_shard(store: Path, name: str, samples: list[dict], base: dict, record: dict,
              max_mb: float = DEFAULT_MAX_MB, check: Callable[[list[dict]], dict] | None = None) -> dict:
    """Add the samples whose prompts the store lacks as one new shard; returns its manifest entry, or {} when every
    prompt is already there. `record` (engine, dtype, sources, rounds, ...) goes into the entry as it is, and so
    does `check(new samples)` as its "float32_check" (how far they agree with HF generate in float32). The shard is
    written before the manifest, each atomically, so a kill leaves the store as
    it was or with the shard added, never a manifest naming a missing file."""
    store = Path(store)
    manifest = read_manifest(store)
    if manifest["base"] is not None and not fingerprints(manifest["base"]) & fingerprints(base):
        raise CtcspecError(f"data store {str(store)!r} holds data distilled from another base model "
                           f"({manifest['base'].get('architecture')}), or in another precision it cannot be checked "
                           "against; use another store")
    have = store_prompts(store)
    new, seen = [], set()
    for s in samples:
        prompt = tuple(s["ids"][:s["prompt_len"]])
        if prompt not in have and prompt not in seen:
            seen.add(prompt)
            new.append(s)
    if not new:
        return {}
    text = "".join(json.dumps({"source": s.get("source", ""), "prompt_len": s["prompt_len"], "ids": s["ids"]},
                              separators=(",", ":")) + "\n" for s in new)
    data = lzma.compress(text.encode(), preset=9)
    used = sum(shard["bytes"] for shard in manifest["shards"])
    if (used + len(data)) / 1e6 > max_mb:
        raise CtcspecError(f"data store {str(store)!r} would hold {(used + len(data)) / 1e6:.1f} MB, past its "
                           f"{max_mb:g} MB budget: keep the data elsewhere (docs/ctc.md), or raise --max-mb")
    checked = {"float32_check": check(new)} if check is not None else {}
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in name)[:60] or "shard"
    file = f"{len(manifest['shards']):04d}-{slug}.jsonl.xz"
    store.mkdir(parents=True, exist_ok=True)
    _write_atomic(store / file, data)  # a kill before the manifest leaves it unlisted; the next add replaces it
    entry = {**record, "file": file, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
             "samples": len(new), "tokens": sum(len(s["ids"]) for s in new),
             "answer_tokens": sum(len(s["ids"]) - s["prompt_len"] for s in new),
             "sources": _by_source(new), "added": time.strftime("%Y-%m-%d"), **checked}
    manifest = {**manifest, "base": _merged_base(manifest["base"], base), "shards": [*manifest["shards"], entry]}
    _write_atomic(store / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    return entry


def _merged_base(known: dict | None, new: dict) -> dict:
    """The store's base description with the fingerprints a new shard's adds (another precision's, say)."""
    if known is None:
        return new
    rounded = {**_rounded(new), **_rounded(known)}
    return {**known, **({"lm_head_sha256_rounded": rounded} if rounded else {})}


def _rounded(base: dict) -> dict:
    rounded = base.get("lm_head_sha256_rounded")
    return rounded if isinstance(rounded, dict) else {}


def _by_source(samples: list[dict]) -> dict[str, dict[str, int]]:
    """Samples and answer tokens per prompt source."""
    counts: dict[str, dict[str, int]] = {}
    for s in samples:
        count = counts.setdefault(s.get("source", ""), {"samples": 0, "answer_tokens": 0})
        count["samples"] += 1
        count["answer_tokens"] += len(s["ids"]) - s["prompt_len"]
    return dict(sorted(counts.items()))


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all (a temporary file, then a rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def store_summary(store: Path) -> dict:
    """What a store holds: shards, samples, tokens, answer tokens, compressed bytes, and per source its samples
    and answer tokens."""
    shards = read_manifest(store)["shards"]
    per_source: dict[str, dict[str, int]] = {}
    for shard in shards:
        for source, count in shard["sources"].items():
            total = per_source.setdefault(source, {"samples": 0, "answer_tokens": 0})
            total["samples"] += count["samples"]
            total["answer_tokens"] += count["answer_tokens"]
    return {"shards": len(shards), **{key: sum(s[key] for s in shards)
                                      for key in ("samples", "tokens", "answer_tokens", "bytes")},
            "sources": dict(sorted(per_source.items()))}


def distill_meta(data_dir: Path) -> dict:
    """A distill directory's meta.json, checked: its base model description and new-token limit."""
    meta_path = Path(data_dir) / META_FILE
    try:
        meta = json.loads(read_text_file(meta_path, "distill metadata"))
    except json.JSONDecodeError:
        meta = None
    if not (isinstance(meta, dict) and isinstance(meta.get("base"), dict)
            and isinstance(meta["base"].get("lm_head_sha256"), str)
            and isinstance(meta.get("max_new_tokens"), int) and meta["max_new_tokens"] > 0):
        raise CtcspecError(f"{str(meta_path)!r} is corrupt: not the metadata of a ctcspec distill directory")
    return meta


def store_distilled(store: Path, data_dir: Path, name: str = "", max_mb: float = DEFAULT_MAX_MB,
                    check: Callable[[list[dict], int], dict] | None = None) -> dict:
    """Add what `ctcspec distill` wrote in `data_dir` (the answers the store lacks) to the store as one shard, with
    the directory's record: new tokens limit and every distill call's options, engine, machine and throughput;
    `check(new samples, the run's new tokens limit)` as add_shard's check."""
    data_dir = Path(data_dir)
    meta = distill_meta(data_dir)
    record = {"from": data_dir.name, "max_new_tokens": meta["max_new_tokens"], "runs": read_runs(data_dir)}
    checked = (lambda new: check(new, meta["max_new_tokens"])) if check is not None else None
    return add_shard(store, name or data_dir.name, read_samples(data_dir), meta["base"], record, max_mb, checked)
