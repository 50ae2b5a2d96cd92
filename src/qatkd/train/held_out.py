"""The balancer's held-out data and pass, for balancers that learn from it (GoR form `heldout`).

`balancer.held_out` of the training set is reserved for the balancer and removed from the
student's training data. The share is drawn by `data.val_seed` among the training samples
(the validation split is already out, and the test set never comes near), so, like the
validation split, it belongs to the data: every seed of a benchmark trains on the same samples
and reserves the same ones, and only initialisation, order and augmentation vary. The engine
knows no family, so the draw is not stratified by class, and the held-out samples are read as
the training set reads them (with its augmentation).

Every `balancer.every` steps, after the training batch's forward, `HeldOutPass` takes the next
batch of the reserved data (a permutation per pass over it, drawn from `seed` and the pass's
number: no state to save, so a resumed run takes the batches an uninterrupted one would), runs
the student on it in eval mode (its BatchNorm statistics and quantizer ranges stay as they are,
and it sees what validation will see), and gives the balancer each loss term's alignment with
the held-out task gradient. Under torchrun the gradients are averaged over the ranks before the
cosines, so every rank measures the alignments of the global batches, as one process would.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import Dataset, Subset, default_collate

from qatkd.balance import LossBalancer, alignments, gradient
from qatkd.balance.base import KDTerms
from qatkd.balance.diagnostics import Gradient
from qatkd.config import Config
from qatkd.device import Precision, to_device
from qatkd.train.distributed import World, mean_over_ranks
from qatkd.train.task import Task
from qatkd.train.validation import split_indices


def reserve_held_out(
    train_set: Dataset, config: Config, balancer: LossBalancer
) -> tuple[Dataset, Dataset | None]:
    """(the student's training data, the balancer's held-out data): `train_set` as it is and
    None for a balancer that does not learn from held-out data."""
    if not balancer.learns_from_held_out:
        return train_set, None
    share = config.balancer.held_out
    kept, held = split_indices(len(train_set), share, config.data.val_seed, key="balancer.held_out")
    return Subset(train_set, kept), Subset(train_set, held)


class HeldOutPass:
    """Measures, every `every` steps, the alignments the balancer learns from (module doc)."""

    def __init__(
        self,
        held: Dataset,
        student: nn.Module,
        task: Task,
        params: Sequence[torch.Tensor],
        config: Config,
        batch_size: int,
        world: World,
        precision: Precision,
    ) -> None:
        self.held, self.student, self.task, self.params = held, student, task, list(params)
        self.every, self.seed = config.balancer.every, config.seed
        self.batch_size, self.world, self.precision = batch_size, world, precision
        self._order: tuple[int, list[int]] = (-1, [])

    def indices(self, update: int) -> list[int]:
        """This rank's positions in the held-out data for pass number `update`: its share of
        the update's global batch, in a fresh permutation each time the data is used up."""
        start = (update * self.world.size + self.world.rank) * self.batch_size
        return [
            self._permutation(pos // len(self.held))[pos % len(self.held)]
            for pos in range(start, start + self.batch_size)
        ]

    def observe(self, balancer: LossBalancer, l_ts: torch.Tensor, l_kd: KDTerms, step: int) -> None:
        """On a step that is due (`step`: the steps done before this one), the alignments of
        L_TS and each KD term of the training batch, handed to `balancer.observe`."""
        if step % self.every:
            return
        samples = [self.held[i] for i in self.indices(step // self.every)]
        batch = to_device(default_collate(samples), self.world.device)
        was_training = self.student.training
        self.student.eval()
        device = self.world.device.type
        with torch.autocast(device, self.precision.dtype, enabled=self.precision.enabled):
            held_loss = self.task.task_loss(self.student(self.task.inputs(batch)), batch)
        self.student.train(was_training)
        terms = [l_ts, *(l_kd if isinstance(l_kd, (list, tuple)) else [l_kd])]
        held_gradient = self._mean(gradient(held_loss, self.params))
        balancer.observe(alignments(held_gradient, terms, self.params, self._mean))

    def _mean(self, grad: Gradient) -> Gradient:
        """`grad`'s mean over the ranks, so that every rank measures the alignments of the
        global batches, as one process with the whole batch would (one all-reduce)."""
        if not self.world.distributed:
            return grad
        present = [g for g in grad if g is not None]
        flat = mean_over_ranks(self.world, torch.cat([g.flatten() for g in present]))
        parts = iter(flat.split([g.numel() for g in present]))
        return [None if g is None else next(parts).view_as(g) for g in grad]

    def _permutation(self, cycle: int) -> list[int]:
        if self._order[0] != cycle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + cycle)
            self._order = (cycle, torch.randperm(len(self.held), generator=generator).tolist())
        return self._order[1]
