"""The distilled-data store: shards and manifest, de-duplication, a held-out split that does not depend on the order
shards came in, refusals, and the distill / store / train / eval commands around it."""

from __future__ import annotations

import json
import lzma
import random

import pytest
import torch

from conftest import run_cli
from ctcspec.errors import CtcspecError
from ctcspec.models import DEFAULT_MODEL
from ctcspec.modules.files import shipped_drafter_dir
from ctcspec.training.data import read_data, split_heldout
from ctcspec.training.distill import read_samples
from ctcspec.training.store import MANIFEST, add_shard, prompt_index, read_manifest, read_store, store_summary

BASE = {"architecture": "LlamaForCausalLM", "hidden_size": 8, "vocab_size": 100, "lm_head_sha256": "aaaa"}


def _samples(count: int, start: int = 0, source: str = "styled") -> list[dict]:
    """Prompt i is [1, i, 2]; its answer is the same whichever call makes it."""
    return [{"index": i, "source": source, "prompt_len": 3, "ids": [1, i, 2] + [random.Random(i).randrange(100)
                                                                                for _ in range(5)]}
            for i in range(start, start + count)]


def test_shards_round_trip_without_duplicates(tmp_path):
    store = tmp_path / "store"
    first = add_shard(store, "one", _samples(30), BASE, {"engine": "hf"})
    assert first["file"] == "0000-one.jsonl.xz" and first["samples"] == 30 and first["engine"] == "hf"
    assert first["answer_tokens"] == 30 * 5 and first["sources"] == {"styled": {"samples": 30, "answer_tokens": 150}}
    again = _samples(30) + _samples(30)  # every prompt already there, and each twice
    assert add_shard(store, "again", again, BASE, {}) == {}
    second = add_shard(store, "two", _samples(20, start=20, source="gsm8k/train.jsonl"), BASE, {})
    assert second["file"] == "0001-two.jsonl.xz" and second["samples"] == 10  # prompts 30..39 only
    samples = read_store(store)
    assert [s["ids"] for s in samples] == [s["ids"] for s in _samples(30) + _samples(10, start=30)]
    assert all(s["index"] == prompt_index(s["ids"][:3]) for s in samples)
    summary = store_summary(store)
    assert (summary["shards"], summary["samples"], summary["answer_tokens"]) == (2, 40, 200)
    assert summary["bytes"] == sum(p.stat().st_size for p in store.glob("*.xz"))
    assert set(summary["sources"]) == {"styled", "gsm8k/train.jsonl"}
    lines = lzma.decompress((store / second["file"]).read_bytes()).decode().splitlines()
    assert json.loads(lines[0]) == {"source": "gsm8k/train.jsonl", "prompt_len": 3,
                                    "ids": _samples(1, start=30)[0]["ids"]}


def test_heldout_split_does_not_depend_on_shard_order(tmp_path):
    a, b = _samples(200), _samples(200, start=200)
    add_shard(tmp_path / "ab", "a", a, BASE, {})
    add_shard(tmp_path / "ab", "b", b, BASE, {})
    add_shard(tmp_path / "ba", "b", b, BASE, {})
    add_shard(tmp_path / "ba", "a", a, BASE, {})
    held = [{tuple(s["ids"]) for s in split_heldout(read_data([tmp_path / name]), 50)[1]} for name in ("ab", "ba")]
    assert held[0] == held[1] and 0 < len(held[0]) < 40


def test_store_beside_a_directory_keeps_one_copy_of_each_prompt(tmp_path):
    add_shard(tmp_path / "store", "s", _samples(10), BASE, {})
    directory = tmp_path / "dir"
    directory.mkdir()
    (directory / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in _samples(10, start=5)))
    for order in ([tmp_path / "store", directory], [directory, tmp_path / "store"]):  # the store first, whatever
        samples = read_data(order)                                                        # order it is given in
        assert len(samples) == 15 and [s["shard"] for s in samples[:10]] == ["0000-s.jsonl.xz"] * 10
        offset = 10_000_000 * order.index(directory)
        assert [s["index"] for s in samples[10:]] == [offset + i for i in range(10, 15)]


def test_a_damaged_or_foreign_store_is_refused(tmp_path):
    store = tmp_path / "store"
    entry = add_shard(store, "one", _samples(10), BASE, {})
    with pytest.raises(CtcspecError, match="another base model"):
        add_shard(store, "two", _samples(5, start=50), {**BASE, "lm_head_sha256": "bbbb"}, {})
    rounded = {**BASE, "lm_head_sha256": "cccc", "lm_head_sha256_rounded": {"bfloat16": "aaaa"}}
    assert add_shard(store, "fp32", _samples(5, start=50), rounded, {})["samples"] == 5  # same weights, fp32
    with pytest.raises(CtcspecError, match="budget"):
        add_shard(store, "big", _samples(5, start=90), BASE, {}, max_mb=0.0001)
    (store / entry["file"]).write_bytes(b"not xz")
    with pytest.raises(CtcspecError, match="sha256"):
        read_store(store)
    (store / MANIFEST).write_text("{")
    with pytest.raises(CtcspecError, match="not valid JSON"):
        read_manifest(store)


def test_distill_store_train_and_eval_commands(capsys, tmp_path, tiny_model_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"w{i} w{i + 1} w{i + 2} w{i}" for i in range(3, 63)) + "\n")
    common = ("--model", tiny_model_dir, "--prompts", prompts, "--max-new-tokens", 16, "--batch-size", 16)
    code, _, err = run_cli(capsys, "distill", *common, "--limit", 20, "--out", tmp_path / "one")
    assert code == 0, err
    store = tmp_path / "store"
    code, out, err = run_cli(capsys, "store", "--model", tiny_model_dir, tmp_path / "one", "--into", store,
                             "--check-float32", 2)
    assert code == 0, err
    assert json.loads(out)["samples"] == 20
    entry = read_manifest(store)["shards"][0]
    assert entry["float32_check"]["answers"] == 2 and entry["float32_check"]["identical"] == 1.0
    assert list(entry["sources"]) == [f"{tmp_path.name}/prompts.txt"]
    assert entry["runs"][0]["sources"] == [str(prompts)] and entry["runs"][0]["answered"] == 20

    code, out, err = run_cli(capsys, "distill", *common, "--store", store, "--out", tmp_path / "two")
    assert code == 0, err
    assert json.loads(out.splitlines()[0])["skipped"] == 20
    assert len(read_samples(tmp_path / "two")) == 40  # the 40 prompts the store lacks, and only those
    code, _, err = run_cli(capsys, "store", tmp_path / "two", "--into", store, "--check-float32", 0)
    assert code == 0, err
    assert "added 0001-two" in err
    code, _, err = run_cli(capsys, "store", tmp_path / "two", "--into", store, "--check-float32", 0)
    assert code == 0 and "nothing new" in err

    drafter = tmp_path / "drafter"
    code, out, err = run_cli(capsys, "train", "--model", tiny_model_dir, "--data", store, "--out", drafter,
                             "--steps", 4, "--batch-size", 8, "--draft-vocab", 40, "--num-slots", 4,
                             "--target-tokens", 3)
    assert code == 0, err
    assert json.loads(out)["train_samples"] + json.loads(out)["heldout_samples"] == 60
    add_shard(store, "later", _samples(5, start=200), read_manifest(store)["base"], {})  # the store grows
    code, _, err = run_cli(capsys, "train", "--model", tiny_model_dir, "--data", store, "--out", drafter,
                           "--steps", 4, "--batch-size", 8, "--draft-vocab", 40, "--num-slots", 4,
                           "--target-tokens", 3, "--resume")
    assert code == 2 and "changed since the checkpoint" in err
    code, _, err = run_cli(capsys, "eval", "--model", tiny_model_dir, "--data", store, "--drafter-path", drafter,
                           "--sources", "nothing.txt", "--threads", 1)
    assert code == 2 and "no held-out samples of the sources nothing.txt" in err


def test_store_and_distill_user_errors(capsys, tmp_path, tiny_model_dir):
    code, _, err = run_cli(capsys, "store", "--into", tmp_path / "s")
    assert code == 2 and "not a data store yet" in err
    code, _, err = run_cli(capsys, "store", tmp_path / "absent", "--into", tmp_path / "s")
    assert code == 2 and "is not a directory written by ctcspec distill" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "store", tmp_path / "empty", "--into", tmp_path / "s", "--check-float32", 0)
    assert code == 2 and "meta.json" in err
    code, _, err = run_cli(capsys, "distill", "--model", tiny_model_dir, "--templated", "--store", tmp_path / "empty",
                           "--out", tmp_path / "d")
    assert code == 2 and "is not a data store" in err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "samples.jsonl").write_text("")
    code, _, err = run_cli(capsys, "store", tmp_path / "empty", "--into", tmp_path / "busy")
    assert code == 2 and "holds other files" in err  # a distill directory never silently becomes a store
    store = tmp_path / "other"
    add_shard(store, "x", _samples(60), BASE, {})
    code, _, err = run_cli(capsys, "train", "--model", tiny_model_dir, "--data", store, "--out", tmp_path / "x")
    assert code == 2 and "another base model" in err
    code, _, err = run_cli(capsys, "distill", "--model", tiny_model_dir, "--templated", "--store", store, "--out",
                           tmp_path / "d2")
    assert code == 2 and "another base model" in err and not (tmp_path / "d2").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "meta.json").write_text(json.dumps({"base": BASE, "max_new_tokens": 8}))
    (foreign / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in _samples(3)))
    code, _, err = run_cli(capsys, "store", foreign, "--into", tmp_path / "new", "--model", tiny_model_dir)
    assert code == 2 and "another base model" in err and not (tmp_path / "new").exists()


@pytest.mark.parametrize("damage", [
    lambda m: m.pop("base"), lambda m: m.update(base="x"), lambda m: m["shards"].append("x"),
    lambda m: m["shards"][0].pop("sources"), lambda m: m["shards"][0].update(bytes="many"),
    lambda m: m["shards"][0].update(file="../../elsewhere.jsonl.xz"),
    lambda m: m["shards"][0].update(sources={"x": 1})])
def test_a_damaged_manifest_is_one_line(capsys, tmp_path, damage):
    store = tmp_path / "store"
    add_shard(store, "one", _samples(10), BASE, {})
    manifest = json.loads((store / MANIFEST).read_text())
    damage(manifest)
    (store / MANIFEST).write_text(json.dumps(manifest))
    drafter = shipped_drafter_dir(DEFAULT_MODEL, "ctc")
    for argv in (("store", "--into", store), ("eval", "--data", store, "--drafter-path", drafter)):
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and "data store manifest" in err and len(err.strip().splitlines()) == 1, err


def test_fingerprints_across_precisions(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from ctcspec.modules.files import describe_base, drafter_base
    from ctcspec.training.data import check_data_base

    fp32 = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    bf16 = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    stores = {}
    for name, base in (("fp32", drafter_base(fp32)), ("old-fp32", describe_base(fp32)), ("bf16", describe_base(bf16))):
        stores[name] = tmp_path / name
        add_shard(stores[name], "s", _samples(3), base, {})
    for model in (fp32, bf16):
        check_data_base([stores["fp32"]], model)   # fp32 data records its rounded fingerprints
    check_data_base([stores["bf16"]], fp32)        # bf16 data, the fp32 model rounded
    check_data_base([stores["old-fp32"]], bf16)    # cannot be checked in bf16: passes
    add_shard(stores["fp32"], "t", _samples(3, start=5), describe_base(bf16), {})  # a bf16 run joins an fp32 store
    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        other.lm_head.weight.add_(1.0)
    with pytest.raises(CtcspecError, match="another base model"):
        check_data_base([stores["fp32"]], other)
