"""What `ctcspec bench --out DIR` writes: the paper's Table 1 as report.md and report.json, every
drafter's answers in FastChat answer jsonl (with per-turn tokens, steps and wall time, so anyone can
recompute beta and gamma), and a PNG plot of speedup and beta per drafter and per category."""

from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

from ctcspec.bench.summary import HF, describe_settings, output_checks, per_category, sampled_rows, write_report

PACKAGE_DIR = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    """A git command's output in the package's directory, or None when git or the repository is not there."""
    try:
        done = subprocess.run(["git", "-C", str(PACKAGE_DIR), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_commit() -> str | None:
    """The commit (git rev-parse HEAD) of the checkout the package runs from; None for an installed copy (the
    package's own files not tracked by git there) or without git."""
    if _git("ls-files", "--error-unmatch", "__init__.py") is None:
        return None
    return _git("rev-parse", "HEAD")


def cpu_model() -> str | None:
    """The CPU's model name, from /proc/cpuinfo where there is one, else platform.processor()."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def environment() -> dict:
    """What made the numbers, for a report's meta: code commit, library versions, CPU and torch threads."""
    return {"commit": code_commit(), "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "cpu_model": cpu_model(), "threads": torch.get_num_threads()}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (every system a bench runs shares the process: the
    torch model, packed weights where used, llama.cpp's mapped GGUF pages)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)  # bytes on macOS, KiB on Linux


def answer_records(report: dict, model_id: str) -> dict[str, list[dict]]:
    """Per system: one FastChat answer record per question, turns in order."""
    out: dict[str, list[dict]] = {}
    for name, turns in report["turns"].items():
        by_question: dict[str, list[dict]] = {}
        for t in turns:
            by_question.setdefault(str(t["question_id"]), []).append(t)
        out[name] = [{
            "question_id": qid, "answer_id": f"{name}-{qid}", "model_id": f"{model_id}/{name}",
            "category": rows[0]["category"],
            "choices": [{"index": 0, "turns": [r["text"] for r in rows], "new_tokens": [r["new_tokens"] for r in rows],
                         "steps": [r["steps"] for r in rows], "wall_time": [r["seconds"] for r in rows]}],
            "tstamp": time.time()} for qid, rows in by_question.items()]
    return out


SAMPLING_CHECKS_NOTE = (
    "Loglik/token: mean log-likelihood per generated token under the base model at the sampling temperature "
    "(teacher-forced, before top-k/top-p and penalties); a sampler that drifted from the base distribution would "
    "differ from HF generate's. Differ from HF generate: outputs not token-identical to HF generate's sample with "
    "the same seed (the same draws, so 0 unless a tree forward rounds a probability differently). ")


def markdown_report(report: dict, meta: dict) -> str:
    systems, cats = report["systems"], per_category(report)
    sampling = sampled_rows(systems)
    check, check_note = (("loglik/token | differ from HF generate", SAMPLING_CHECKS_NOTE) if sampling
                         else ("differ from vanilla", ""))
    lines = [f"# ctcspec bench: {meta.get('bench', meta.get('questions'))}", "",
             f"Model `{Path(str(meta.get('model', '?'))).name}`, {meta.get('n_questions')} questions "
             f"({sum(1 for _ in report['turns'].get('vanilla', []))} turns), {meta.get('max_new_tokens')} new tokens, "
             f"{describe_settings(meta.get('settings_in_effect'), meta.get('seed'))}, "
             f"{meta.get('device')} {meta.get('dtype')}, "
             f"threads {meta.get('threads')}, "
             f"linear kernels {meta.get('kernels', 'plain')} (HF generate: always the stock layers).", "",
             *([f"Interrupted: {meta.get('n_questions')} of {meta.get('n_questions_planned')} questions done "
                "(`ctcspec bench ... --resume` continues).", ""] if meta.get("complete") is False else []),
             "β: tokens per base-model forward. γ: mean over turns of tokens/s ÷ the reference's tokens/s. "
             "Time-weighted: total tokens ÷ total seconds, over vanilla's. Draft %: share of decoding time spent "
             f"drafting. {check_note}Loops: answers ending in a repetition loop.", "",
             "| drafter | β | tok/s | γ vs vanilla | (median) | time-weighted vs vanilla | γ vs HF generate | draft % "
             f"| {check} | loops |",
             "|---" * 8 + "|---" * (3 if sampling else 2) + "|"]
    for name, s in systems.items():
        cells = [f"{s[k]:.2f}x" if k in s else "-" for k in (
            "speedup_vs_vanilla", "median_speedup_vs_vanilla", "time_weighted_speedup_vs_vanilla", f"speedup_vs_{HF}")]
        draft = f"{100 * s['draft_share']:.1f}" if "draft_share" in s else "-"
        lines.append(f"| {name} | {s['beta']:.2f} | {s['tokens_per_s']:.1f} | {' | '.join(cells)} | {draft} | "
                     f"{' | '.join(output_checks(s, sampling))} | {s.get('answers_ending_in_loop', '-')} |")
    categories = sorted({c for rows in cats.values() for c in rows})
    if len(categories) > 1:
        lines += ["", "Per category, β / γ vs vanilla:", "",
                  "| drafter | " + " | ".join(categories) + " |", "|---" * (len(categories) + 1) + "|"]
        for name, rows in cats.items():
            cells = [f"{rows[c]['beta']:.2f} / {rows[c].get('speedup_vs_vanilla', float('nan')):.2f}x"
                     if c in rows else "-" for c in categories]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    settings = meta.get("drafter_settings") or {}
    if settings:
        lines += ["", "Drafter settings: " + "; ".join(
            f"{n}: " + (", ".join(f"{k} {v}" for k, v in s.items()) or "defaults") for n, s in settings.items()) + "."]
    if meta.get("command"):
        lines += ["", f"Command: `{meta['command']}`"]
    return "\n".join(lines) + "\n"


def plot_report(report: dict, path: Path) -> None:
    """Three panels: overall gamma and beta per drafter; gamma per category; beta per category."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = {n: s for n, s in report["systems"].items() if n != HF}
    cats = per_category(report)
    categories = sorted({c for n in systems for c in cats.get(n, {})})
    names = list(systems)
    fig, (left, *panels) = plt.subplots(1, 3, figsize=(18, 4.5), gridspec_kw={"width_ratios": [1, 2, 2]})
    xs = range(len(names))
    width = 0.38
    left.bar([x - width / 2 for x in xs], [systems[n].get("speedup_vs_vanilla", 0) for n in names], width,
             label="speedup γ vs vanilla")
    left.bar([x + width / 2 for x in xs], [systems[n]["beta"] for n in names], width, label="β (tokens / forward)")
    left.axhline(1.0, color="grey", linewidth=0.8)
    left.set_xticks(list(xs), names, rotation=30, ha="right")
    left.set_title("overall")
    left.legend(fontsize=8)
    step = 0.8 / max(1, len(names))
    for panel, key, label in zip(panels, ("speedup_vs_vanilla", "beta"), ("speedup γ vs vanilla", "β"), strict=True):
        for i, n in enumerate(names):
            values = [cats.get(n, {}).get(c, {}).get(key, 0) for c in categories]
            panel.bar([k + (i - (len(names) - 1) / 2) * step for k in range(len(categories))], values, step, label=n)
        panel.axhline(1.0, color="grey", linewidth=0.8)
        panel.set_xticks(list(range(len(categories))), categories, rotation=30, ha="right")
        panel.set_title(f"{label} per category")
        panel.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(report: dict, meta: dict, out_dir: Path) -> dict[str, Path]:
    """report.json, report.md, plot.png and answers/<drafter>.jsonl under out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json", "markdown": out_dir / "report.md", "plot": out_dir / "plot.png"}
    write_report(report, paths["json"], meta)
    paths["markdown"].write_text(markdown_report(report, meta), encoding="utf-8")
    plot_report(report, paths["plot"])
    model_id = Path(str(meta.get("model", "model"))).name
    for name, records in answer_records(report, model_id).items():
        path = out_dir / "answers" / f"{name.replace('+', '_')}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return paths
