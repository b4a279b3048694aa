"""Gather the training summaries and acceptance curves of ablation drafters into one JSON file.

    python scripts/collect_ablations.py WORK_DIR OUT.json    (WORK_DIR holds abl-*/config.json)
"""

import json
import sys
from pathlib import Path

work, out = Path(sys.argv[1]), Path(sys.argv[2])
rows = {}
for config_path in sorted(work.glob("abl-*/config.json")):
    config = json.loads(config_path.read_text())
    rows[config_path.parent.name.removeprefix("abl-")] = {
        "draft": config["draft"], "training": config["training"], "acceptance_curve": config["acceptance_curve"]}
out.write_text(json.dumps(rows, indent=2) + "\n")
print(f"{len(rows)} ablation runs -> {out}")
