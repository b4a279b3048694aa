"""Summaries of a bench run, computed from its per-turn records (dicts: question_id, category, turn, new_tokens,
steps, seconds, text; from a live run also draft_s, verify_s, bookkeeping_s and the token ids; from a sampling run
loglik): per system beta, tokens/s, speedups (mean and median over turns of the per-turn tokens/s ratio, the paper's
gamma, and the time-weighted ratio of total tokens over total seconds), outputs differing from vanilla (greedy) or
the mean log-likelihood per token of the outputs (sampling), answers ending in a repetition loop, per category, and
the plain-text tables the CLI prints."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from ctcspec.bench.peers import LlamaCppPeer, VllmPeer
from ctcspec.bench.questions import Question, select_questions

HF = "hf_generate"
LLAMA_CPP = LlamaCppPeer.name  # llama.cpp's plain greedy decoding, when a bench ran it
VLLM = VllmPeer.name  # vLLM's plain greedy decoding, when a bench ran it
PEER_REFERENCES = {LLAMA_CPP: "vs llama.cpp", VLLM: "vs vLLM"}  # peers compared with, and their columns
REFERENCES = ("vanilla", HF, *PEER_REFERENCES)  # systems every row is compared with, where the run has them
TIMINGS = ("draft_s", "verify_s", "bookkeeping_s")


def ends_in_loop(text: str, window: int = 300, min_len: int = 8, max_len: int = 100) -> bool:
    """Whether the text ends in a repetition loop: some tail piece of its last `window` characters, `min_len` to
    `max_len` - 1 characters long, occurs 3 or more times in that window."""
    tail = text[-window:]
    return any(tail.count(tail[-n:]) >= 3 for n in range(min_len, max_len))


def tokens_per_s(record: dict) -> float:
    """One turn's tokens per second (0 for a turn that took no measurable time)."""
    return record["new_tokens"] / record["seconds"] if record["seconds"] else 0.0


def _ratios(records: list[dict], reference: list[dict]) -> list[float]:
    """Per-turn tokens/s ratios against the reference's same turns (turns where the reference made none skipped)."""
    return [tokens_per_s(a) / tokens_per_s(b) for a, b in zip(records, reference, strict=True) if tokens_per_s(b) > 0]


def _throughput(records: list[dict]) -> float:
    seconds = sum(r["seconds"] for r in records)
    return sum(r["new_tokens"] for r in records) / seconds if seconds else 0.0


def _output(record: dict):
    """What two systems' outputs are compared by: the token ids where saved, else the text."""
    return record.get("tokens", record["text"])


def _timing_shares(records: list[dict]) -> dict[str, float]:
    """Shares of decoding time spent drafting and in bookkeeping; empty for records without the split."""
    if not all(all(k in r for k in TIMINGS) for r in records):
        return {}
    decode = sum(r[k] for r in records for k in TIMINGS) or 1.0
    return {"draft_share": sum(r["draft_s"] for r in records) / decode,
            "bookkeeping_share": sum(r["bookkeeping_s"] for r in records) / decode}


def sampled(records: list[dict]) -> bool:
    """Whether the records come from a sampling run: every turn carries its output's log-likelihood."""
    return bool(records) and all("loglik" in r for r in records)


def _loglik_per_token(records: list[dict]) -> dict[str, float]:
    """Sampling: the outputs' summed log-likelihood over their summed tokens; empty when greedy or no tokens."""
    tokens = sum(r["new_tokens"] for r in records)
    if not sampled(records) or not tokens:
        return {}
    return {"loglik_per_token": sum(r["loglik"] for r in records) / tokens}


def describe_settings(in_effect: dict | None, seed: int | None) -> str:
    """How tokens were chosen, in words: "greedy" or "sampling, seed S", then the knobs in effect (a report
    from before the settings were recorded was greedy)."""
    in_effect = in_effect or {"do_sample": False}
    knobs = ", ".join(f"{key} {value}" for key, value in in_effect.items() if key != "do_sample" and value is not None)
    mode = f"sampling, seed {seed}" if in_effect["do_sample"] else "greedy"
    return f"{mode} ({knobs})" if knobs else mode


def summarize_system(records: list[dict], turns: dict[str, list[dict]]) -> dict:
    """One system's row. Invariants: `records` is not empty, and it and every reference's records in `turns` are
    the same turns in the same order (zip(strict=True) fails otherwise)."""
    tokens = sum(r["new_tokens"] for r in records)
    steps = sum(r["steps"] for r in records)
    row = {"turns": len(records), "tokens": tokens, "steps": steps, "beta": tokens / steps if steps else 0.0,
           "tokens_per_s": statistics.mean(tokens_per_s(r) for r in records), **_timing_shares(records)}
    for ref_name in REFERENCES:
        ratios = _ratios(records, turns[ref_name]) if ref_name in turns else []
        if ratios:
            row[f"speedup_vs_{ref_name}"] = statistics.mean(ratios)
            row[f"median_speedup_vs_{ref_name}"] = statistics.median(ratios)
    reference = turns.get("vanilla")
    if reference is not None:
        if _throughput(reference):
            row["time_weighted_speedup_vs_vanilla"] = _throughput(records) / _throughput(reference)
        if not sampled(records):  # sampled outputs differ by chance; their log-likelihood is checked instead
            row["outputs_differing_from_vanilla"] = sum(
                _output(a) != _output(b) for a, b in zip(records, reference, strict=True))
    if sampled(records) and HF in turns:
        # The engine draws one token per emitted token from the processed distribution, as HF's loop does, so with
        # the same seed it reproduces HF's sample unless a forward over a tree rounds a probability differently.
        row[f"outputs_differing_from_{HF}"] = sum(
            _output(a) != _output(b) for a, b in zip(records, turns[HF], strict=True))
    row.update(_loglik_per_token(records))
    row["answers_ending_in_loop"] = sum(ends_in_loop(r["text"]) for r in records)
    return row


def summarize_turns(turns: dict[str, list[dict]]) -> dict[str, dict]:
    """Every system's row, from per-turn records grouped by system (systems in the order given)."""
    return {name: summarize_system(records, turns) for name, records in turns.items()}


def report_of(records: list[dict], systems: list[str]) -> dict:
    """The report {"systems": rows, "turns": per system its records in run order, without token ids} of a run's
    records (each with a "system"); the rows compare outputs by token ids."""
    by_system = {name: [r for r in records if r["system"] == name] for name in systems}
    lean = {name: [{k: v for k, v in r.items() if k not in ("system", "tokens")} for r in rows]
            for name, rows in by_system.items()}
    return {"systems": summarize_turns(by_system), "turns": lean}


def subset_report(report: dict, per_category: int | None = None, limit: int | None = None) -> dict:
    """The report restricted to the first `per_category` questions of each category, then the first `limit`
    (file order, as `bench --per-category/--limit` picks them), its rows recomputed from the per-turn records.
    With neither, all questions: the saved rows win (they compared token ids), recomputation fills what an older
    report lacks."""
    turns = report["turns"]
    order = list(dict.fromkeys((r["question_id"], r["category"]) for rows in turns.values() for r in rows))
    picked = select_questions([Question(qid, cat, ()) for qid, cat in order], per_category, limit)
    keep = {q.question_id for q in picked}
    turns = {name: [r for r in rows if r["question_id"] in keep] for name, rows in turns.items()}
    systems = summarize_turns(turns)
    if per_category is None and limit is None:
        systems = {name: {**row, **report["systems"].get(name, {})} for name, row in systems.items()}
    return {"systems": systems, "turns": turns}


def _align(rows: list[list[str]]) -> str:
    """A plain-text table: first column left-aligned, the rest right-aligned, a rule under the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def per_category_of(turns: dict[str, list[dict]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per system and category: beta and mean speedup vs vanilla, from per-turn records grouped by system."""
    reference = turns.get("vanilla")
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, records in turns.items():
        groups: dict[str, list[tuple[dict, dict | None]]] = {}
        for i, rec in enumerate(records):
            groups.setdefault(rec["category"] or "-", []).append((rec, reference[i] if reference else None))
        out[name] = {}
        for category, pairs in groups.items():
            row = {"beta": sum(r["new_tokens"] for r, _ in pairs) / max(1, sum(r["steps"] for r, _ in pairs))}
            ratios = [tokens_per_s(r) / tokens_per_s(v) for r, v in pairs if v is not None and tokens_per_s(v) > 0]
            if ratios:
                row["speedup_vs_vanilla"] = statistics.mean(ratios)
            out[name][category] = row
    return out


def per_category(report: dict) -> dict[str, dict[str, dict[str, float]]]:
    """per_category_of the report's per-turn records."""
    return per_category_of(report["turns"])


def format_category_table(report: dict) -> str:
    cats = per_category(report)
    categories = sorted({c for rows in cats.values() for c in rows})
    header = ["beta / speedup", *categories]
    rows = [header] + [[name, *(f"{rows[c]['beta']:.2f} / {rows[c].get('speedup_vs_vanilla', float('nan')):.2f}x"
                                if c in rows else "-" for c in categories)]
                       for name, rows in cats.items()]
    return _align(rows)


def _times(s: dict, key: str) -> str:
    return f"{s[key]:.2f}x" if key in s else "-"


def _percent(s: dict, key: str) -> str:
    return f"{100 * s[key]:.1f}" if key in s else "-"


def sampled_rows(systems: dict[str, dict]) -> bool:
    """Whether a report's rows come from a sampling run (they check the outputs' log-likelihood)."""
    return any("loglik_per_token" in s for s in systems.values())


def output_checks(s: dict, sampling: bool) -> list[str]:
    """One row's output checks: outputs differing from vanilla (greedy); sampling, the mean log-likelihood per token
    and the outputs differing from HF generate's with the same seed."""
    if sampling:
        return [f"{s['loglik_per_token']:.3f}" if "loglik_per_token" in s else "-",
                str(s.get(f"outputs_differing_from_{HF}", "-"))]
    return [str(s.get("outputs_differing_from_vanilla", "-"))]


def format_table(report: dict) -> str:
    """One row per system; "vs vanilla" is gamma (mean of per-turn ratios), "time-wtd" total tokens over total
    seconds against vanilla's, "differ" the outputs differing from vanilla's (greedy) or, sampling, "loglik/token"
    the outputs' mean log-likelihood per token under the base model, "loops" the answers ending in a repetition
    loop."""
    peers = [name for name in PEER_REFERENCES if any(f"speedup_vs_{name}" in s for s in report["systems"].values())]
    sampling = sampled_rows(report["systems"])
    header = ["system", "beta", "tok/s", "vs vanilla", "(median)", "time-wtd", "vs HF", "(median)",
              *(column for name in peers for column in (PEER_REFERENCES[name], "(median)")), "draft%", "bookkeep%",
              *(["loglik/token", "differ vs HF"] if sampling else ["differ"]), "loops"]
    rows = [header]
    for name, s in report["systems"].items():
        rows.append([
            name, f"{s['beta']:.2f}", f"{s['tokens_per_s']:.1f}",
            *(_times(s, key) for key in (
                "speedup_vs_vanilla", "median_speedup_vs_vanilla", "time_weighted_speedup_vs_vanilla",
                "speedup_vs_hf_generate", "median_speedup_vs_hf_generate",
                *(key for name in peers for key in (f"speedup_vs_{name}", f"median_speedup_vs_{name}")))),
            _percent(s, "draft_share"), _percent(s, "bookkeeping_share"),
            *output_checks(s, sampling), str(s.get("answers_ending_in_loop", "-")),
        ])
    return _align(rows)


def write_report(report: dict, path: Path, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, **report, "per_category": per_category(report)}, indent=2) + "\n")


def read_report(path: str | Path) -> dict:
    """A saved report: a `bench --out` directory or its report.json (or an older single-file report)."""
    path = Path(path)
    return json.loads((path / "report.json" if path.is_dir() else path).read_text(encoding="utf-8"))
