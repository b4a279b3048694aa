"""Size of a drafter and how much of distilled answers its draft vocabulary covers.

    python scripts/drafter_stats.py [DRAFTER_DIR] [--data DIR ...]
    (default drafter: the one shipped for SmolLM2; --data: directories written by ctcspec distill)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safetensors.torch import load_file

from ctcspec.checkpoint import default_drafter_dir
from ctcspec.train import read_data, split_heldout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("drafter", nargs="?", type=Path, default=default_drafter_dir("smollm2-135m-instruct"))
    parser.add_argument("--data", nargs="*", type=Path, default=[])
    args = parser.parse_args()
    tensors = load_file(str(args.drafter / "model.safetensors"))
    vocab = set(tensors.pop("vocab_ids").tolist())
    size = sum(f.stat().st_size for f in args.drafter.iterdir())
    print(f"{args.drafter}: {sum(t.numel() for t in tensors.values()):,} trained parameters, "
          f"draft vocabulary {len(vocab)}, {size / 1e6:.1f} MB on disk")
    if args.data:
        samples = read_data(args.data)
        answers = sum(len(s["ids"]) - s["prompt_len"] for s in samples)
        print(f"data: {len(samples):,} distinct prompts, {sum(len(s['ids']) for s in samples):,} tokens "
              f"({answers:,} answer tokens)")
        for name, group in zip(("train", "held-out"), split_heldout(samples, 50), strict=True):
            tokens = [t for s in group for t in s["ids"][s["prompt_len"]:]]
            covered = sum(t in vocab for t in tokens) / len(tokens)
            print(f"{name}: {len(group):,} answers; the draft vocabulary covers {covered:.1%} of their tokens")


if __name__ == "__main__":
    main()
