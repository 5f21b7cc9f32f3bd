"""PISTOL end to end: forget edge A_B of the LUNAR release's PISTOL sample (retain the other 19 edges)
with lunar-lens (`unlearn --layer auto --coeff auto`) and with the released recipe's settings at the same
layer; evaluate, attack, tables and figures (`experiments/real_data.py`).

    .venv/bin/python experiments/run_pistol.py            # fine-tunes first when experiments/runs/pistol has no model

The PISTOL sample is small (400 QA), so it runs whole on a CPU; `--device cuda` runs every step on a GPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import real_data


def request(sets: Path) -> real_data.Request:
    """Forget edge A_B, retain the other edges (files of RUN/sets)."""
    return real_data.Request("A_B", sets / "forget.json", sets / "retain.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    real_data.add_arguments(parser, "pistol")
    args = parser.parse_args()
    finetuned = real_data.ensure_model("pistol", args, [])
    ab = request(Path(args.run) / "sets")
    results = {ab.name: real_data.run_request(ab, args)}
    real_data.write_results("pistol", finetuned, results, args)


if __name__ == "__main__":
    main()
