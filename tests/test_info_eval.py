"""`ctcspec info` (what a saved drafter holds, without a model) and `ctcspec eval` (held-out acceptance of
drafters side by side, and the speedups this machine's cost curve predicts)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from ctc_helpers import tiny_heads_module, tiny_module, write_distilled
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import run_cli
from ctcspec.backends import make_backend
from ctcspec.budget import COST_SIZES, cost_cache_path
from ctcspec.models import load_model
from ctcspec.modules.files import describe_base, load_drafter_module, read_config, save_drafter
from ctcspec.pricing import BudgetPlan, expected_rate
from ctcspec.training.compare import ablation_rows, heldout_samples, predict, read_ablations
from ctcspec.training.distill import read_samples
from ctcspec.training.evaluate import acceptance_curve

SHIPPED = Path(__file__).resolve().parent.parent / "src/ctcspec/data/drafters"
ABLATIONS = Path(__file__).resolve().parent.parent / "docs/ablations"
COST = {q: 0.01 * (1 + q / 8) for q in COST_SIZES}  # seconds of a q-node verification forward


@pytest.fixture(scope="module")
def tiny_setup(tiny_model_dir, tmp_path_factory):
    """The tiny base model, a CTC and a Medusa drafter saved for it, and distilled data (2 held out of 60)."""
    root = tmp_path_factory.mktemp("eval")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    base = describe_base(model)
    save_drafter(root / "ctc", tiny_module(model, vocab=48, num_slots=4, target_tokens=3), base,
                 {"training": {"steps": 5}}, dtype=torch.float32)
    save_drafter(root / "medusa", tiny_heads_module(model, "medusa", vocab=48, depth=3), base, dtype=torch.float32)
    write_distilled(model, root / "data", count=60, answer_len=20)
    cost = cost_cache_path(make_backend(load_model(str(tiny_model_dir), kernels="plain").model), COST_SIZES)
    cost.parent.mkdir(parents=True, exist_ok=True)  # a known cost curve: no timing run, exact predictions
    cost.write_text(json.dumps(COST))
    return model, root


@pytest.mark.parametrize("kind", ["ctc", "medusa", "hydra", "eagle"])
def test_info_on_the_shipped_drafters(capsys, kind):
    path = SHIPPED / f"smollm2-135m-instruct-{kind}"
    config = json.loads((path / "config.json").read_text())
    code, out, err = run_cli(capsys, "info", path, "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["kind"] == kind and info["base"] == config["base"] and info["draft_vocab_size"] == 8192
    assert info["parameters"] == config.get("parameters", 4_651_202)  # the CTC config predates the field
    assert info["size_bytes"] == sum((path / f).stat().st_size for f in ("config.json", "model.safetensors"))
    assert info["training"]["steps"] == config["training"]["steps"] and info["training"]["data"]
    assert set(info["acceptance_curve"]) == set(config["acceptance_curve"])
    code, out, _ = run_cli(capsys, "info", path)
    assert code == 0 and f"{info['parameters']:,} (bf16)" in out and "| tree budget |" in out
    assert "LM head sha256 " + config["base"]["lm_head_sha256"] in out


def test_info_data_coverage_of_the_draft_vocabulary(capsys, tiny_setup):
    _, root = tiny_setup
    code, out, err = run_cli(capsys, "info", root / "ctc", "--data", root / "data", "--json")
    assert code == 0, err
    info = json.loads(out)
    vocab = set(load_file(str(root / "ctc" / "model.safetensors"))["vocab_ids"].tolist())
    samples = {s["index"]: s for s in read_samples(root / "data")}
    heldout = [t for i in (0, 50) for t in samples[i]["ids"][samples[i]["prompt_len"]:]]
    coverage = info["data_coverage"]
    assert coverage["prompts"] == 60 and coverage["heldout"]["answers"] == 2 and coverage["train"]["answers"] == 58
    assert coverage["heldout"]["covered"] == pytest.approx(sum(t in vocab for t in heldout) / len(heldout))
    assert info["training"] == {"steps": 5} and info["weights_dtype"] == ["F32"]
    code, out, _ = run_cli(capsys, "info", root / "ctc", "--data", root / "data")
    assert code == 0 and "60 distinct prompts" in out and "held-out: 2 answers" in out
    assert "held-out acceptance: none saved" in out


def _broken(directory: Path, how: str) -> Path:
    """A copy of a shipped drafter, broken one way."""
    shutil.copytree(SHIPPED / "smollm2-135m-instruct-ctc", directory)
    config_path, weights = directory / "config.json", directory / "model.safetensors"
    config = json.loads(config_path.read_text())
    if how == "no config":
        config_path.unlink()
    elif how == "config not json":
        config_path.write_text("{")
    elif how == "no weights":
        weights.unlink()
    elif how == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:50_000])
    elif how == "no vocab_ids":
        save_file({"slot_embed": torch.zeros(6, 4)}, str(weights))
    elif how == "vocabulary mismatch":
        config["draft"]["draft_vocab_size"] = 100
        config_path.write_text(json.dumps(config))
    elif how == "bad curves":
        config["acceptance_curve"] = {"beam": [1, 2]}
        config_path.write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("how", ["missing", "no config", "config not json", "no weights", "truncated weights",
                                 "no vocab_ids", "vocabulary mismatch", "bad curves"])
def test_info_on_a_broken_drafter_is_one_line(capsys, tmp_path, how):
    path = tmp_path / "missing" if how == "missing" else _broken(tmp_path / "d", how)
    code, out, err = run_cli(capsys, "info", path)
    assert code == 2 and out == ""
    assert err.startswith("ctcspec: error: ") and err.count("\n") == 1, err


def test_eval_measures_each_drafter_on_the_training_heldout_split(capsys, tmp_path, tiny_model_dir, tiny_setup):
    model, root = tiny_setup
    out_json = tmp_path / "eval.json"
    code, out, err = run_cli(capsys, "eval", "--model", tiny_model_dir, "--kernels", "plain", "--data", root / "data",
                             "--drafter-path", root / "ctc", "--drafter-path", root / "medusa", "--transforms",
                             "beam,none", "--budgets", "4,1,2", "--samples", 2, "--anchors", 8, "--json", out_json)
    assert code == 0, err
    record = json.loads(out_json.read_text())
    rows = {row["label"]: row for row in record["rows"]}
    assert list(rows) == ["ctc (beam)", "ctc (none)", "medusa"]
    assert record["budgets"] == [1, 2, 4]
    heldout = heldout_samples([root / "data"], 2)
    assert [s["index"] for s in heldout] == [0, 50]  # every 50th sample, as training holds out
    cost = {int(q): s for q, s in record["cost_curve"].items()}
    assert cost == pytest.approx(COST)  # this machine's (cached) curve
    for label, path, mode in (("ctc (beam)", "ctc", "beam"), ("ctc (none)", "ctc", "none"), ("medusa", "medusa", None)):
        module, _ = load_drafter_module(root / path, model)
        expected = acceptance_curve(module, model, heldout, mode, budgets=(1, 2, 4), max_anchors=8)
        row = rows[label]
        assert {int(b): a for b, a in row["acceptance"].items()} == pytest.approx(expected)
        assert row["tree_budget"] in (1, 2, 4) and row["speedup"] > 0
        rate = expected_rate(expected[row["tree_budget"]], row["tree_budget"], cost, row["draft_seconds"])
        assert row["speedup"] == pytest.approx(rate * cost[1])
    assert rows["ctc (beam)"]["steps"] == 5 and rows["medusa"]["parameters"] > 0
    assert "| ctc (beam) |" in out and "| medusa |" in out and "verification cost curve" in out


def test_ablation_rows_predict_the_best_budget():
    runs = read_ablations(ABLATIONS)
    labels = [label for label, _, _ in runs]
    assert labels == ["n8k6", "n6k4", "n12k8", "causal", "ce", "fullvocab", "round1_default"]
    cost = {1: 1.0, 2: 1.1, 4: 1.2, 8: 1.6, 16: 2.4, 32: 4.0, 64: 8.0}
    draft = {1: 0.1, 4: 0.1, 16: 0.2}
    rows = ablation_rows(runs, ["beam"], (1, 4, 16), cost, draft)
    assert [r.label for r in rows] == [f"{label} (beam)" for label in labels]
    for (_, change, run), row in zip(runs, rows, strict=True):
        curve = {b: run["acceptance_curve"]["beam"][str(b)] for b in (1, 4, 16)}
        plan = BudgetPlan(curve, cost, draft)
        assert row.acceptance == curve and row.note == change
        assert row.tree_budget == max(curve, key=plan.rate)
        assert row.speedup == pytest.approx(plan.rate(row.tree_budget) * cost[1])
        assert row.draft_seconds == draft[row.tree_budget]
    assert predict({1: 0.0}, cost, {1: 0.0}) == (1, pytest.approx(1 / 1.1))  # nothing accepted: slower than plain
    shipped = read_config(SHIPPED / "smollm2-135m-instruct-ctc")
    assert read_ablations(ABLATIONS, {"shipped": shipped})[-1] == ("shipped", "full run, 2 epochs", shipped)


def test_eval_ablations_prices_saved_curves_with_a_ctc_drafter(capsys, tmp_path, tiny_model_dir, tiny_setup):
    _, root = tiny_setup
    saved = json.loads((ABLATIONS / "round1.json").read_text())
    (tmp_path / "round1.json").write_text(json.dumps({k: saved[k] for k in ("n6k4", "n8k6")}))
    shutil.copy(ABLATIONS / "round1_default_config.json", tmp_path / "default_config.json")
    out_json = tmp_path / "out.json"
    code, out, err = run_cli(capsys, "eval", "--model", tiny_model_dir, "--kernels", "plain", "--ablations", tmp_path,
                             "--drafter-path", root / "ctc", "--budgets", "1,4,16", "--json", out_json)
    assert code == 0, err
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["label"] for r in rows] == ["n8k6 (beam)", "n8k6 (topk)", "n6k4 (beam)", "n6k4 (topk)",
                                          "default (beam)", "default (topk)"]
    assert rows[2]["acceptance"] == {str(b): saved["n6k4"]["acceptance_curve"]["beam"][str(b)] for b in (1, 4, 16)}
    assert rows[0]["note"].startswith("reference") and rows[4]["note"] == "full run, 3 epochs"
    assert "| change |" in out


@pytest.mark.parametrize("argv, message", [
    (["--budgets", "0,4"], "--budgets"),
    (["--transforms", "beam,sideways"], "sideways"),
    (["--data", "NOWHERE", "--drafter-path", "CTC"], "no distilled data"),
    ([], "--drafter-path"),
    (["--ablations", "NOWHERE", "--drafter-path", "CTC"], "does not exist"),
    (["--ablations", str(ABLATIONS), "--drafter-path", "MEDUSA"], "CTC drafter"),
    (["--ablations", str(ABLATIONS), "--drafter-path", "CTC", "--sources", "styled"], "--sources picks"),
    (["--drafter-path", "CTC", "--sources", ","], "--sources"),
    (["--drafter-path", str(SHIPPED / "smollm2-135m-instruct-ctc")], "another base model"),
])
def test_eval_user_errors_are_one_line(capsys, tmp_path, tiny_model_dir, tiny_setup, argv, message):
    _, root = tiny_setup
    argv = [{"NOWHERE": tmp_path / "nowhere", "CTC": root / "ctc", "MEDUSA": root / "medusa"}.get(a, a) for a in argv]
    if "--data" not in argv and "--ablations" not in argv:
        argv += ["--data", root / "data"]
    code, _, err = run_cli(capsys, "eval", "--model", tiny_model_dir, "--kernels", "plain", *argv)
    assert code == 2 and message in err and err.count("\n") == 1, err
