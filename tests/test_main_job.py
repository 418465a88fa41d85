"""The README's main job, run exactly as configured: ``lightning-peft fit --config configs/lora.yaml``.

This is the run a new user sees first, so it is tested as is (no step or data overrides): held-out
perplexity must improve, the exported adapter must reload, and the Lightning checkpoint it writes must
be adapter-only (under 2% of the full model's weights). It takes about three minutes on 2 CPU cores.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from lightning_peft.recipes.cli import PEFTLightningCLI

pytestmark = [pytest.mark.assets, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_main_job_improves_held_out_perplexity(assets_dir, tmp_path, monkeypatch):
    # Configs use repo-relative paths; run in a scratch dir whose `assets` is the prepared assets, so
    # outputs/ lands in tmp_path and not in the checkout.
    (tmp_path / "assets").symlink_to(assets_dir.resolve(), target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    cli = PEFTLightningCLI(args=["fit", "--config", str(REPO_ROOT / "configs" / "lora.yaml"), "--trainer.enable_progress_bar=false"])

    before, after = cli.metrics_before["val_perplexity"], cli.metrics_after["val_perplexity"]
    assert after < 0.9 * before, f"held-out perplexity {before:.2f} -> {after:.2f}"
    assert (tmp_path / "outputs" / "lora" / "adapter" / "adapter_model.safetensors").exists()

    (checkpoint,) = tmp_path.glob("outputs/lora/**/*.ckpt")
    full = io.BytesIO()
    torch.save(cli.model.model.state_dict(), full)
    assert checkpoint.stat().st_size < 0.02 * full.tell(), (checkpoint.stat().st_size, full.tell())
