"""β and speedup vs vanilla of a saved bench report, restricted to a subset of its questions, so a
smaller run can be compared with the same questions of a bigger one.

    python scripts/subset_table.py runs/mt_bench_3pc --per-category 1
    python scripts/subset_table.py runs/gsm8k_50 --limit 16
"""

from __future__ import annotations

import argparse
import statistics

from ctcspec.bench import read_report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("report")
    parser.add_argument("--per-category", type=int, default=None)
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    turns = read_report(args.report)["turns"]
    order, seen = [], {}
    for record in turns["vanilla"]:
        qid, category = record["question_id"], record["category"]
        if qid in order:
            continue
        seen[category] = seen.get(category, 0) + 1
        if args.per_category is None or seen[category] <= args.per_category:
            order.append(qid)
    keep = set(order[: args.limit] if args.limit else order)
    reference = [r for r in turns["vanilla"] if r["question_id"] in keep]
    print(f"{len(keep)} questions, {len(reference)} turns")
    for name, records in turns.items():
        records = [r for r in records if r["question_id"] in keep]
        beta = sum(r["new_tokens"] for r in records) / sum(r["steps"] for r in records)
        ratios = [(r["new_tokens"] / r["seconds"]) / (v["new_tokens"] / v["seconds"])
                  for r, v in zip(records, reference, strict=True)]
        print(f"{name:12s} beta {beta:.2f}  speedup {statistics.mean(ratios):.2f}x "
              f"(median {statistics.median(ratios):.2f}x)")


if __name__ == "__main__":
    main()
