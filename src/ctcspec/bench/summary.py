"""Summaries of a bench run: per system beta, tokens/s and speedups (mean and median over turns of the
per-turn tokens/s ratio, the paper's gamma), per category, and the plain-text tables the CLI prints."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ctcspec.bench.run import SystemRuns

HF = "hf_generate"


def _ratios(runs: SystemRuns, reference: SystemRuns) -> list[float]:
    return [a.tokens_per_s / b.tokens_per_s for a, b in zip(runs.turns, reference.turns, strict=True)
            if b.tokens_per_s > 0]


def summarize(runs: dict[str, SystemRuns], tokenizer) -> dict:
    reference = runs.get("vanilla")
    systems = {}
    for name, r in runs.items():
        tokens = sum(len(t.tokens) for t in r.turns)
        steps = sum(t.steps for t in r.turns)
        decode = sum(t.draft_s + t.verify_s + t.bookkeeping_s for t in r.turns) or 1.0
        row = {
            "turns": len(r.turns), "tokens": tokens, "steps": steps,
            "beta": tokens / steps if steps else 0.0,
            "tokens_per_s": statistics.mean(t.tokens_per_s for t in r.turns),
            "draft_share": sum(t.draft_s for t in r.turns) / decode,
            "bookkeeping_share": sum(t.bookkeeping_s for t in r.turns) / decode,
        }
        for ref_name in ("vanilla", HF):
            if ref_name in runs:
                ratios = _ratios(r, runs[ref_name])
                row[f"speedup_vs_{ref_name}"] = statistics.mean(ratios)
                row[f"median_speedup_vs_{ref_name}"] = statistics.median(ratios)
        if reference is not None:
            row["outputs_differing_from_vanilla"] = sum(
                a.tokens != b.tokens for a, b in zip(r.turns, reference.turns, strict=True))
        systems[name] = row
    turns = {name: [{"question_id": t.question_id, "category": t.category, "turn": t.turn,
                     "new_tokens": len(t.tokens), "steps": t.steps, "seconds": t.seconds,
                     "text": tokenizer.decode(t.tokens, skip_special_tokens=True)} for t in r.turns]
             for name, r in runs.items()}
    return {"systems": systems, "turns": turns}


def _align(rows: list[list[str]]) -> str:
    """A plain-text table: first column left-aligned, the rest right-aligned, a rule under the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def per_category(report: dict) -> dict[str, dict[str, dict[str, float]]]:
    """Per system and category: beta and mean speedup vs vanilla, from the saved per-turn records."""
    turns = report["turns"]
    reference = turns.get("vanilla")
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, records in turns.items():
        groups: dict[str, list[tuple[dict, dict | None]]] = {}
        for i, rec in enumerate(records):
            groups.setdefault(rec["category"] or "-", []).append((rec, reference[i] if reference else None))
        out[name] = {}
        for category, pairs in groups.items():
            row = {"beta": sum(r["new_tokens"] for r, _ in pairs) / max(1, sum(r["steps"] for r, _ in pairs))}
            ratios = [(r["new_tokens"] / r["seconds"]) / (v["new_tokens"] / v["seconds"])
                      for r, v in pairs if v is not None and r["seconds"] and v["seconds"] and v["new_tokens"]]
            if ratios:
                row["speedup_vs_vanilla"] = statistics.mean(ratios)
            out[name][category] = row
    return out


def format_category_table(report: dict) -> str:
    cats = per_category(report)
    categories = sorted({c for rows in cats.values() for c in rows})
    header = ["beta / speedup", *categories]
    rows = [header] + [[name, *(f"{rows[c]['beta']:.2f} / {rows[c].get('speedup_vs_vanilla', float('nan')):.2f}x"
                                if c in rows else "-" for c in categories)]
                       for name, rows in cats.items()]
    return _align(rows)


def format_table(report: dict) -> str:
    systems = report["systems"]
    header = ["system", "beta", "tok/s", "vs vanilla", "(median)", "vs HF", "(median)", "draft%", "bookkeep%",
              "differ"]
    rows = [header]
    for name, s in systems.items():
        rows.append([
            name, f"{s['beta']:.2f}", f"{s['tokens_per_s']:.1f}",
            *(f"{s[key]:.2f}x" if key in s else "-" for key in (
                "speedup_vs_vanilla", "median_speedup_vs_vanilla", "speedup_vs_hf_generate",
                "median_speedup_vs_hf_generate")),
            f"{100 * s['draft_share']:.1f}", f"{100 * s['bookkeeping_share']:.1f}",
            str(s.get("outputs_differing_from_vanilla", "-")),
        ])
    return _align(rows)


def write_report(report: dict, path: Path, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, **report, "per_category": per_category(report)}, indent=2) + "\n")


def read_report(path: str | Path) -> dict:
    """A saved report: a `bench --out` directory or its report.json (or an older single-file report)."""
    path = Path(path)
    return json.loads((path / "report.json" if path.is_dir() else path).read_text(encoding="utf-8"))
