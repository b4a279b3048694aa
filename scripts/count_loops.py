"""How many answers in a bench report end in a repetition loop (a tail piece of text repeated 3+ times).

    python scripts/count_loops.py runs/mt_bench_3pc [--system vanilla]

Small models often loop on long answers; prompt lookup copies the loop, so its beta on such answers says
more about the model than about the drafter. This puts a number on it.
"""

from __future__ import annotations

import argparse

from ctcspec.bench import read_report


def ends_in_loop(text: str, window: int = 300, min_len: int = 8, max_len: int = 100) -> bool:
    tail = text[-window:]
    return any(tail.count(tail[-n:]) >= 3 for n in range(min_len, max_len))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("report")
    ap.add_argument("--system", default="vanilla")
    args = ap.parse_args()
    turns = read_report(args.report)["turns"][args.system]
    looping = sum(ends_in_loop(t["text"]) for t in turns)
    print(f"{looping} of {len(turns)} {args.system} answers end in a repetition loop")
    for turn in sorted({t["turn"] for t in turns}):
        sub = [t for t in turns if t["turn"] == turn]
        print(f"  turn {turn + 1}: {sum(ends_in_loop(t['text']) for t in sub)} of {len(sub)}")


if __name__ == "__main__":
    main()
