"""The command line's progress bar counts optimizer steps in max_steps runs ("Step 3/3", not Lightning's
"Epoch 0/-2"), with Rich and with TQDM, and keeps Lightning's description in epoch-bounded runs."""

from __future__ import annotations

import pytest

from lightning_helpers import LitCausalLM, make_trainer, token_loader
from lightning_peft.recipes.progress_bar import RichStepProgressBar, TQDMStepProgressBar, rich_available, step_progress_bar

RICH = rich_available()

# transformers 5 brings rich (through typer); with older releases it may be absent, and Lightning then uses TQDM.
BARS = [
    pytest.param(RichStepProgressBar, id="rich", marks=pytest.mark.skipif(not RICH, reason="rich is not installed")),
    pytest.param(TQDMStepProgressBar, id="tqdm"),
]


def _description(bar) -> str:
    if isinstance(bar, RichStepProgressBar):
        return bar.progress.tasks[bar.train_progress_bar_id].description.strip()
    return bar.train_progress_bar.desc.removesuffix(": ")  # tqdm adds the separator itself


@pytest.mark.parametrize("bar_class", BARS)
def test_max_steps_run_shows_steps_out_of_max_steps(tmp_path, bar_class):
    seen = []

    class Recording(bar_class):
        def on_train_batch_end(self, trainer, *args, **kwargs):
            super().on_train_batch_end(trainer, *args, **kwargs)
            seen.append(_description(self))

    bar = Recording()
    trainer = make_trainer(tmp_path, max_steps=3, enable_progress_bar=True, callbacks=[bar])
    trainer.fit(LitCausalLM(), train_dataloaders=token_loader(n_batches=5))
    assert seen == ["Step 1/3", "Step 2/3", "Step 3/3"]


@pytest.mark.parametrize("bar_class", BARS)
def test_epoch_bounded_run_keeps_lightnings_description(tmp_path, bar_class):
    seen = []

    class Recording(bar_class):
        def on_train_batch_end(self, trainer, *args, **kwargs):
            super().on_train_batch_end(trainer, *args, **kwargs)
            seen.append(_description(self))

    trainer = make_trainer(tmp_path, max_steps=-1, max_epochs=1, enable_progress_bar=True, callbacks=[Recording()])
    trainer.fit(LitCausalLM(), train_dataloaders=token_loader(n_batches=2))
    assert len(seen) == 2 and all(d.startswith("Epoch 0") and "Step" not in d for d in seen)


def test_default_is_the_backend_lightning_would_choose():
    assert isinstance(step_progress_bar(), RichStepProgressBar if RICH else TQDMStepProgressBar)
