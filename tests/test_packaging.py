"""The declared dependency ranges are the tested ones: every lower bound in pyproject.toml is pinned,
at exactly that version, in the constraints file CI's lower-bound stage installs with (.ci/run), and
that stage checks the pins are what got installed (.ci/versions.py --expect)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lower_bounds() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["test"]
    bounds = {}
    for requirement in requirements:
        match = re.match(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*>=\s*([0-9][^,;\s]*)", requirement)
        assert match, f"{requirement!r} in pyproject.toml has no lower bound: CI cannot test its lowest version"
        bounds[match.group(1).lower()] = match.group(2)
    return bounds


def pins() -> dict[str, str]:
    text = (ROOT / ".ci" / "constraints-lowest.txt").read_text()
    return {m.group(1).lower(): m.group(2) for m in re.finditer(r"^([A-Za-z0-9_.-]+)==(\S+)", text, re.M)}


def test_every_lower_bound_is_pinned_by_the_lowest_stage():
    bounds, pinned = lower_bounds(), pins()
    assert {name: pinned.get(name) for name in bounds} == bounds
    assert not set(pinned) - set(bounds), f"pins without a declared lower bound: {sorted(set(pinned) - set(bounds))}"


def test_ci_runs_the_readme_test_command_in_fresh_environments():
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"^pip install .*\[test\].*pytest.*$", readme, re.M)
    assert command and command.group(0).startswith("pip install torch==2.13.0 ")
    run = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m venv" in run and "grep -m1 -E '^pip install .*\\[test\\].*pytest' README.md" in run
    assert "-c .ci/constraints-lowest.txt" in run and "--expect .ci/constraints-lowest.txt" in run


def test_plain_lora_never_imports_bitsandbytes():
    # bitsandbytes prints start-up messages on import (0.50: "Failed to load CPU gemm_4bit_forward from
    # kernels-community"): a run that quantizes nothing must not load it.
    import subprocess
    import sys

    script = (
        "import sys; sys.path.insert(0, 'tests')\n"
        "from tiny_models import tiny_llama\n"
        "from lightning_peft import LoRA, apply_peft, save_adapter, load_adapter, merge_adapters\n"
        "from lightning_peft.recipes.cli import PEFTLightningCLI\n"
        "import tempfile\n"
        "model = tiny_llama(0); apply_peft(model, LoRA(r=2, target_modules='all-linear'))\n"
        "path = tempfile.mkdtemp() + '/adapter'; save_adapter(model, path); load_adapter(tiny_llama(0), path)\n"
        "merge_adapters(model)\n"
        "print('bitsandbytes' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False"
    assert "kernels-community" not in done.stderr
