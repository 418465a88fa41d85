# Reproduction for docs/post-fit-checkpoints.md: plain Lightning, no lightning_peft.
# Plain Lightning, no lightning_peft: where a resume from a post-fit trainer.save_checkpoint() starts.
import tempfile, torch, lightning.pytorch as L
from torch.utils.data import DataLoader
class M(L.LightningModule):
    def __init__(self):
        super().__init__(); self.w = torch.nn.Parameter(torch.zeros(1)); self.seen = []
    def training_step(self, batch, i):
        self.seen.append((self.global_step + 1, self.current_epoch, i)); return (self.w * batch.float()).sum()
    def configure_optimizers(self): return torch.optim.SGD(self.parameters(), lr=0.1)
def fit(max_steps, ckpt=None):
    m = M(); t = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    t.fit(m, DataLoader(torch.arange(8), batch_size=2), ckpt_path=ckpt); return m, t
tmp = tempfile.mkdtemp()
whole, _ = fit(7)
for stop in (2, 4):
    _, t = fit(stop); t.save_checkpoint(f"{tmp}/after.ckpt")
    resumed, _ = fit(7, f"{tmp}/after.ckpt")
    print(f"stop {stop}: uninterrupted {whole.seen[stop:]}\n        resumed       {resumed.seen}")
