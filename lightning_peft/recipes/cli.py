"""``lightning-peft``: the command line.

    lightning-peft prepare-assets [--root assets]        # unpack the offline models and data
    lightning-peft fit --config configs/lora.yaml        # fine-tune; held-out metrics before -> after
    lightning-peft fit --config configs/lora.yaml --print_config

It is LightningCLI with these changes:

* ``peft:`` is a top-level key holding :class:`~lightning_peft.PEFTCallback`'s arguments::

      peft:
        method: {class_path: lightning_peft.LoRA, init_args: {r: 8, target_modules: [q_proj, v_proj]}}
        export_dir: outputs/lora

  ``method: null`` (the default) adds no callback: plain full fine-tuning, the reference to compare with.
* There is no top-level ``optimizer:`` key. LightningCLI would build that optimizer from
  ``model.parameters()`` before the adapters exist, so they would never train; the tasks in
  :mod:`lightning_peft.recipes.tasks` take ``model.init_args.optimizer`` instead and build it from the
  trainable parameters.

``fit`` validates once before training and once after, and prints the held-out metrics side by side
(``held-out val_perplexity: 77.10 -> 57.13``), so every run says whether fine-tuning helped.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Optional, Union

import lightning.pytorch as L
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_only

import lightning_peft.methods  # noqa: F401

# Imported so that short class paths (`CausalLMTask`, `LoRA`, `TextFileDataModule`) resolve in configs.
import lightning_peft.recipes.data  # noqa: F401
import lightning_peft.recipes.tasks  # noqa: F401
from lightning_peft.integration.callback import PEFTCallback
from lightning_peft.methods.base import PEFTMethod
from lightning_peft.recipes.assets import main as prepare_assets_main
from lightning_peft.recipes.cli_errors import ConfigError, check_config_file, config_paths, summarize
from lightning_peft.recipes.progress_bar import step_progress_bar

PEFT_KEY = "peft"


class PEFTLightningCLI(LightningCLI):
    """LightningCLI with an optional ``peft:`` key and held-out metrics before and after ``fit``.

    Example::

        PEFTLightningCLI(args=["fit", "--config", "configs/lora.yaml"])
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        #: Validation metrics of the untouched model and of the fine-tuned one (``fit`` only).
        self.metrics_before: dict[str, float] = {}
        self.metrics_after: dict[str, float] = {}
        kwargs.setdefault("model_class", L.LightningModule)
        kwargs.setdefault("datamodule_class", L.LightningDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        # Optimizers come from the task's `optimizer` argument, built from trainable parameters only.
        kwargs.setdefault("auto_configure_optimizers", False)
        # Re-running a config writes config.yaml again into the same directory; that is not an error.
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        # Parse errors raise instead of printing the whole usage first: main() reports the cause (cli_errors.py).
        kwargs.setdefault("parser_kwargs", {"exit_on_error": False})
        super().__init__(*args, **kwargs)

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]) -> None:
        main_kwargs.setdefault(
            "description",
            "Parameter-efficient fine-tuning with PyTorch Lightning. "
            "`lightning-peft prepare-assets` unpacks the offline demo models and data; "
            "`lightning-peft fit --config configs/lora.yaml` trains.",
        )
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # PEFTCallback's arguments under `peft:`, but with `method` optional: add_lightning_class_args
        # would make the callback (and so a method) mandatory. The callback is built in instantiate_trainer.
        parser.add_class_arguments(PEFTCallback, PEFT_KEY, instantiate=False, skip={"method"}, fail_untyped=False)
        parser.add_argument(
            f"--{PEFT_KEY}.method",
            type=Optional[Union[PEFTMethod, list[PEFTMethod]]],
            default=None,
            help="PEFT method, e.g. {class_path: lightning_peft.LoRA, init_args: {r: 8}}; null: full fine-tuning",
        )

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        peft = self._get(self.config_init, PEFT_KEY, default=None)
        method = getattr(peft, "method", None) if peft is not None else None
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        extra = [self._get(self.config_init, key) for key in self._parser(self.subcommand).callback_keys]
        configured = trainer_config.get("callbacks") or []
        configured = configured if isinstance(configured, list) else [configured]
        if trainer_config.get("enable_progress_bar", True) is not False and not any(isinstance(cb, ProgressBar) for cb in [*configured, *extra]):
            extra.append(step_progress_bar())  # "Step 7/20" rather than Lightning's "Epoch 0/-2" in max_steps runs
        if method is not None:
            if any(isinstance(cb, PEFTCallback) for cb in configured):
                raise ValueError(
                    "a PEFTCallback is configured both under `peft:` and in `trainer.callbacks`; keep only the `peft:` "
                    "key (or set `peft.method: null` and configure it in trainer.callbacks)"
                )
            options = {k: v for k, v in dict(peft).items() if k != "method"}
            extra.append(PEFTCallback(method=method, **options))
        return self._instantiate_trainer(trainer_config, extra)

    # -- fit: held-out metrics before and after ----------------------------------------------------
    def _validate(self) -> dict[str, float]:
        source = self.datamodule if self.datamodule is not None else self.model
        if not (is_overridden("validation_step", self.model) and is_overridden("val_dataloader", source)):
            return {}  # nothing to compare; _print_comparison says so
        results = self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
        return {k: float(v) for k, v in (results[0] if results else {}).items()}

    def before_fit(self) -> None:
        self.metrics_before = self._validate()

    def after_fit(self) -> None:
        if self.trainer.interrupted:
            return  # Ctrl-C or an exception in a callback: the "after" number would mean nothing
        self.metrics_after = self._validate()
        _print_comparison(self.metrics_before, self.metrics_after)


@rank_zero_only
def _print_comparison(before: dict[str, float], after: dict[str, float]) -> None:
    names = [name for name in before if name in after and name.startswith("val_")]
    if not names:
        print("held-out metrics: none (the model or data has no validation, or logs no val_* metric)", flush=True)
    for name in names:
        print(f"held-out {name}: {_format(before[name])} -> {_format(after[name])}", flush=True)


def _format(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


class _DropAdvertisingTips(logging.Filter):
    """Lightning logs "💡 Tip: ... try installing litlogger/litmodels" on every run; in a terminal full of
    training output those lines push out what matters. The command line drops them (a library user's own
    Trainer keeps Lightning's logging as it is)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def quiet_lightning_tips() -> None:
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropAdvertisingTips) for f in logger.filters):
        logger.addFilter(_DropAdvertisingTips())


def run_cli(args: Optional[list[str]] = None) -> PEFTLightningCLI:
    """Run the training command line (``fit``, ``validate``, ...) on ``args`` and return the CLI object."""
    quiet_lightning_tips()
    return PEFTLightningCLI(args=args)


def main(args: Optional[list[str]] = None) -> int:
    """Entry point of ``lightning-peft``: ``prepare-assets`` or a LightningCLI subcommand.

    A configuration error exits with status 2 and one message whose first line is the cause (see
    cli_errors.py); ``LIGHTNING_PEFT_TRACEBACK=1`` shows the full traceback instead.
    """
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "prepare-assets":
        return prepare_assets_main(argv[1:]) or 0
    try:
        for path in config_paths(argv):
            check_config_file(path)
        run_cli(args)  # None: LightningCLI reads sys.argv itself (and warns if given both)
    except Exception as err:  # noqa: BLE001 - only configuration errors are reported here; the rest re-raise
        message = str(err) if isinstance(err, ConfigError) else summarize(err)
        if message is None or os.environ.get("LIGHTNING_PEFT_TRACEBACK"):
            raise
        print(f"error: {message}", file=sys.stderr)
        print("(lightning-peft fit --help lists every option; LIGHTNING_PEFT_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
