"""A shortened soak (benchmarks/soak.py --steps 400): checkpoints and step exports are pruned to save_top_k=3,
resident memory stays flat, and the last checkpoint resumes. The 2,000-step figures are in RESULTS.md."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from lightning_helpers import clean_environment

ROOT = Path(__file__).resolve().parents[1]


def test_a_long_run_keeps_three_checkpoints_and_exports_flat_memory_and_resumes():
    done = subprocess.run([sys.executable, "benchmarks/soak.py", "--steps", "400"], cwd=ROOT, capture_output=True, text=True, timeout=600, env=clean_environment())
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "checkpoints: ['epoch=47-step=380.ckpt', 'epoch=48-step=390.ckpt', 'epoch=49-step=400.ckpt', 'last.ckpt']" in out, out
    assert "exports: ['step-380', 'step-390', 'step-400']" in out, out
    assert "last.ckpt resumed: global_step 401 (expected 401)" in out
    first, last = (float(v) for v in re.search(r"RSS ([\d.]+) -> ([\d.]+) MiB", out).groups())
    assert last - first < 30, out  # MiB over 400 steps and 40 checkpoints: no leak per checkpoint or export
