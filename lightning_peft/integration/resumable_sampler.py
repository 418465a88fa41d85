"""A shuffling data loader that resumes mid-epoch, so a run killed between checkpoints continues with the batches
the uninterrupted run would have seen.

Lightning restores the step and epoch counters from a checkpoint but not a plain ``DataLoader``'s position:
a resume mid-epoch replays the epoch from its first batch (warning "your dataloader is not resumable"), and
every shipped config stops mid-epoch (``max_steps``). The permutation of each epoch here comes from
``(seed, epoch)`` alone, not from the global generator at the moment iteration starts, and the loader's
``state_dict`` (which Lightning stores in the checkpoint for loaders that have one) records how many batches
of the current epoch the loop has *processed*: Lightning's own count, which its one-batch prefetch does not
run ahead of (a count of the batches the loader handed out would be one too many). On resume the sampler
skips those batches' indices once, without loading them.

Several processes (DDP, FSDP): Lightning swaps a loader's sampler for a ``DistributedSampler`` (rebuilding the
loader with ``sampler=``). This loader takes that sampler's ``num_replicas``/``rank``/``drop_last`` and keeps its
own order, sharded the way ``DistributedSampler`` shards (padded by repeating the head of the permutation, then
every ``num_replicas``-th index from ``rank``), so every rank resumes mid-epoch too. Any other sampler a user
passes is kept as it is; then a mid-epoch resume restarts the epoch, and says so.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler


class ResumableSampler(Sampler[int]):
    """Indices ``0..n-1``, shuffled per epoch from ``seed + epoch`` (or in order), this rank's shard of them
    (``num_replicas`` > 1), skipping a resumed prefix.

    Lightning calls :meth:`set_epoch` at the start of every epoch, as for ``DistributedSampler``.
    """

    def __init__(self, length: int, shuffle: bool, seed: int, num_replicas: int = 1, rank: int = 0, drop_last: bool = False) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"ResumableSampler: rank={rank} is not in [0, num_replicas={num_replicas})")
        self.length = length
        self.shuffle = shuffle
        self.seed = int(seed)
        self.num_replicas, self.rank, self.drop_last = num_replicas, rank, drop_last
        self.epoch = 0
        self.skip = 0  # indices of epoch `skip_epoch` to leave out (the done part of a resumed epoch)
        self.skip_epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if epoch != self.skip_epoch:
            self.skip = 0  # the resumed epoch is over

    def order(self, epoch: int) -> list[int]:
        """This rank's indices of ``epoch``, in order."""
        if not self.shuffle:
            whole = list(range(self.length))
        else:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            whole = torch.randperm(self.length, generator=generator).tolist()
        if self.num_replicas == 1:
            return whole
        total = self.num_replicas * len(self)
        while len(whole) < total:  # DistributedSampler's padding: every rank gets as many batches
            whole += whole[: total - len(whole)]
        return whole[self.rank : total : self.num_replicas]

    def resume_at(self, epoch: int, indices_done: int) -> None:
        """Leave out the first ``indices_done`` indices of ``epoch``'s order the next time it is iterated."""
        self.epoch, self.skip_epoch = epoch, epoch
        self.skip = indices_done if indices_done < len(self) else 0  # a finished epoch: the next starts whole

    def __iter__(self) -> Iterator[int]:
        # Lightning may start an iterator more than once for the same epoch (setup_data, then the fetcher):
        # the resumed epoch's skip holds until set_epoch moves on.
        skip = self.skip if self.epoch == self.skip_epoch else 0
        return iter(self.order(self.epoch)[skip:])

    def __len__(self) -> int:
        # This rank's whole epoch: Lightning sizes the epoch from this and counts the resumed part as done itself.
        if self.num_replicas == 1:
            return self.length
        if self.drop_last:
            return self.length // self.num_replicas
        return -(-self.length // self.num_replicas)


def resume_position(trainer: Any) -> dict[str, int]:
    """Where the training loop is: its epoch and the batches of that epoch it has processed (0 and 0 outside
    a ``fit``)."""
    if trainer is None or getattr(trainer.state, "fn", None) != "fit":
        return {"epoch": 0, "batches": 0}
    loop = trainer.fit_loop.epoch_loop
    return {"epoch": int(trainer.current_epoch), "batches": int(loop.batch_progress.current.processed)}


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` whose position survives a checkpoint.

    ``position``: returns ``{"epoch", "batches"}`` of the training loop (:func:`resume_position` of the trainer).
    Every other keyword goes to ``DataLoader``. A ``DistributedSampler`` passed in (Lightning's, when several
    processes train) lends its rank and world size to ours; any other ``sampler`` replaces ours, and then a resume
    restarts the epoch.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        position: Callable[[], dict[str, int]] | None = None,
        **kwargs: Any,
    ) -> None:
        given = kwargs.get("sampler")
        if given is None or isinstance(given, DistributedSampler):
            shard = dict(num_replicas=given.num_replicas, rank=given.rank, drop_last=given.drop_last) if given is not None else {}
            kwargs["sampler"] = ResumableSampler(len(dataset), shuffle=shuffle, seed=seed, **shard)  # type: ignore[arg-type]
        # Every new iterator draws its workers' base seed from this generator; without one it draws from the
        # global generator, so a resumed run (which starts an iterator where the uninterrupted one did not)
        # would shift every later dropout mask.
        kwargs.setdefault("generator", torch.Generator().manual_seed(seed))
        super().__init__(dataset, batch_size=batch_size, **kwargs)
        self.shuffle, self.seed, self.position = shuffle, seed, position

    def state_dict(self) -> dict[str, Any]:
        where = self.position() if self.position is not None else {"epoch": 0, "batches": 0}
        return {"seed": self.seed, **where}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(self.sampler, ResumableSampler):
            if state.get("batches"):
                rank_zero_warn(
                    f"resuming mid-epoch with your own sampler {type(self.sampler).__name__}: the epoch restarts from its"
                    " first batch (leave `sampler` unset, or pass a DistributedSampler, to resume where the run stopped)"
                )
            return
        self.seed = self.sampler.seed = int(state["seed"])
        self.sampler.resume_at(int(state["epoch"]), int(state["batches"]) * int(self.batch_size or 1))
