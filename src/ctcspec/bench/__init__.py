"""The side-by-side benchmark: questions.py (what is asked), run.py (every system on every turn, question by
question), store.py (DIR/run.json and DIR/turns.jsonl: saved progress, --resume), summary.py (beta, speedups,
loops, subsets, tables), report.py (the report files `bench --out DIR` writes)."""
