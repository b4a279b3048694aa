"""The side-by-side benchmark: questions.py (what is asked), run.py (every system on every turn),
summary.py (beta, speedups, tables), report.py (what `bench --out DIR` writes)."""
