"""The bad-input table in docs/ is generated from the suite and up to date, and it covers every area."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bad_input_table_is_current_and_covers_at_least_60_inputs():
    done = subprocess.run([sys.executable, "docs/bad_inputs.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = [line for line in (ROOT / "docs" / "bad-inputs.md").read_text().splitlines() if line.startswith("| ") and "`" in line]
    assert len(rows) >= 60
    areas = {row.split(" | ")[0].removeprefix("| ") for row in rows}
    assert {"LoRA", "quantization", "YAML / CLI", "checkpoints", "files", "strategies"} <= areas, areas
