"""PEFTCallback on your own LightningModule: LoRA on SmolLM2, then the adapter loads in HF peft.

    lightning-peft prepare-assets          # once: offline SmolLM2 + Hamlet into ./assets
    python examples/lora_callback.py       # ~1 minute on 2 CPU cores

Nothing here knows about lightning_peft except the callback line and the export at the end: the
module is an ordinary LightningModule that calls its transformers model as usual.
"""

from __future__ import annotations

import lightning as L
import torch
from transformers import AutoModelForCausalLM

from lightning_peft import LoRA, PEFTCallback, save_adapter
from lightning_peft.recipes.data import TextFileDataModule

MODEL = "assets/smollm2-135m-instruct"


class CausalLM(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(**batch).loss, prog_bar=True)

    def configure_optimizers(self):
        # Built after PEFTCallback.setup: only the adapters are trainable by then.
        return torch.optim.AdamW((p for p in self.parameters() if p.requires_grad), lr=5e-4)


def main() -> None:
    L.seed_everything(0)
    data = TextFileDataModule(tokenizer=MODEL, train_file="assets/data/hamlet.txt", block_size=128, batch_size=4, max_val_blocks=16)
    module = CausalLM()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=10,
        logger=False,
        enable_checkpointing=False,
        callbacks=[PEFTCallback(LoRA(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))],
    )
    before = trainer.validate(module, datamodule=data, verbose=False)[0]["val_loss"]
    trainer.fit(module, datamodule=data)
    after = trainer.validate(module, datamodule=data, verbose=False)[0]["val_loss"]
    print(f"held-out loss: {before:.3f} -> {after:.3f}")

    save_adapter(module.model, "outputs/example_adapter")
    # The same directory loads in HF peft (if installed) with no lightning_peft involved:
    #   PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(MODEL), "outputs/example_adapter")
    print("adapter written to outputs/example_adapter")


if __name__ == "__main__":
    main()
