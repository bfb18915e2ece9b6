"""Benchmarks of trio_dpsup: ``python -m bench [--quick]`` (see the README's Performance)."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def write_result(stem: str, document: object) -> Path:
    """Write `document` as bench/results/STEM.json, say where, and return the path."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{stem}.json"
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {path}")
    return path
