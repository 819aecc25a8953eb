"""Data-parallel meta-training under torchrun: each process computes its share of a meta-batch, and the shares are
combined so that the result is the one-process result over the whole meta-batch (up to float rounding):

- every process samples the whole meta-batch from the same seeded generator and assembles only its own slice,
  so the episodes, and their order, do not depend on the number of processes;
- each process backpropagates its slice's losses divided by the global meta-batch, and the gradients are summed
  across processes: the mean-loss gradient of one process;
- BatchNorm running averages, which each process advanced over its own slice only, are merged into the averages
  one process advancing over the whole meta-batch in order would hold (see ``_merge_running_stats``).

Without torchrun (no WORLD_SIZE in the environment, or WORLD_SIZE=1) the group is one process and every
operation here is the identity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fsltool.errors import FsltoolError

BACKENDS = {"cpu": "gloo", "cuda": "nccl"}  # by the device the parameters live on
STORE_TIMEOUT = timedelta(minutes=5)  # for a handshake among processes that have all passed a barrier


@dataclass(frozen=True)
class RunningStats:
    """The BatchNorm running averages of a network before a meta-step: the starting point to merge from, and
    what a skipped meta-step restores."""

    modules: list[_BatchNorm]
    means: list[torch.Tensor]
    variances: list[torch.Tensor]
    counts: list[torch.Tensor]

    @classmethod
    def of(cls, network: nn.Module) -> RunningStats:
        modules = [m for m in network.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
        return cls(
            modules,
            [m.running_mean.clone() for m in modules],  # type: ignore[union-attr]
            [m.running_var.clone() for m in modules],  # type: ignore[union-attr]
            [m.num_batches_tracked.clone() for m in modules],  # type: ignore[union-attr]
        )

    def restore(self) -> None:
        for module, mean, var, count in zip(self.modules, self.means, self.variances, self.counts):
            module.running_mean.copy_(mean)  # type: ignore[union-attr]
            module.running_var.copy_(var)  # type: ignore[union-attr]
            module.num_batches_tracked.copy_(count)  # type: ignore[union-attr]


@dataclass(frozen=True)
class Group:
    """This process's place among the processes of one training run."""

    rank: int = 0
    world: int = 1

    @property
    def writer(self) -> bool:
        """Only one process writes checkpoints, logs and progress bars."""
        return self.rank == 0

    def share(self, parts: int, key: str = "train.meta_batch", noun: str = "episodes") -> range:
        """The positions among ``parts`` (a meta-batch's episodes, a pretraining batch's micro-batches) this process
        computes: contiguous, equally many for every process; ``key`` is the recipe key that sets ``parts``."""
        if parts % self.world:
            raise FsltoolError(
                f"recipe key {key!r}: {parts} {noun} do not divide among {self.world} processes (WORLD_SIZE); use a multiple of {self.world}"
            )
        size = parts // self.world
        return range(self.rank * size, (self.rank + 1) * size)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the processes (in place; the same tensor back)."""
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor

    def sum_gradients(self, parameters: list[nn.Parameter]) -> None:
        """Sum the gradients over the processes, in one collective. Which parameters have a gradient depends on
        the method and the episode shape only, so it is the same set in every process."""
        if self.world == 1:
            return
        grads = [p.grad for p in parameters if p.grad is not None]
        flat = self.sum(torch.cat([g.reshape(-1) for g in grads]))
        for grad, piece in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(piece.view_as(grad))

    def merge_running_stats(self, before: RunningStats) -> None:
        if self.world > 1 and before.modules:
            _merge_running_stats(self, before)

    def leave(self, finished: bool) -> None:
        """Tear the process group down. A run that ``finished`` waits twice first: at a barrier (rank 0 still
        validates and checkpoints after the last step), then until every process has come out of that barrier,
        through torchrun's rendezvous store. gloo aborts a process ("terminate called without an active exception")
        whose peer closes its connections while that process is still sending (pytorch/gloo#155), which a barrier
        alone allows: one process can leave it before the other's last message has gone. After an error nobody
        waits: the other processes may never arrive."""
        if self.world == 1 or not dist.is_initialized():
            return
        if finished:
            dist.barrier()
            self._all_reach("left-barrier")
        dist.destroy_process_group()

    def _all_reach(self, point: str) -> None:
        """Return once every process has called this with ``point``: a handshake through the rendezvous store,
        which under torchrun lives in the launcher and outlives the processes, not through the collective
        backend."""
        store = dist.distributed_c10d._get_default_store()
        store.set(f"fsltool/{point}/{self.rank}", "1")
        store.wait([f"fsltool/{point}/{rank}" for rank in range(self.world)], STORE_TIMEOUT)


def _merge_running_stats(group: Group, before: RunningStats) -> None:
    """One process updating a running average r over updates x_1..x_N in order (momentum m) ends at
    (1-m)^N r_0 + sum_i m (1-m)^(N-i) x_i. Process k, starting from r_0 over its n_k updates, ends at R_k; its
    updates come after those of processes < k, and the updates of processes > k decay them further by
    (1-m)^(n_{k+1} + ... ). So the one-process result is (1-m)^N r_0 + sum_k (1-m)^(later_k) (R_k - (1-m)^(n_k) r_0),
    one sum across processes. The update counts are exchanged first (they may differ between BatchNorm layers).
    Everything stays on the statistics' device (NCCL takes no CPU tensors), with no read back to the host."""
    for module in before.modules:
        if module.momentum is None:
            raise FsltoolError("distributed training: BatchNorm with momentum=None (cumulative averages) is not supported")
    device = before.counts[0].device
    counts = torch.zeros(len(before.modules), group.world, dtype=torch.float64, device=device)
    counts[:, group.rank] = torch.stack([m.num_batches_tracked - start for m, start in zip(before.modules, before.counts)])  # type: ignore[operator]
    group.sum(counts)
    later = counts.flip(1).cumsum(1).flip(1)[:, group.rank] - counts[:, group.rank]
    decays = [1.0 - float(module.momentum) for module in before.modules]  # type: ignore[arg-type]
    pieces = []
    for row, (module, mean0, var0) in enumerate(zip(before.modules, before.means, before.variances)):
        own, weight = decays[row] ** counts[row, group.rank], decays[row] ** later[row]
        for current, start in ((module.running_mean, mean0), (module.running_var, var0)):
            pieces.append(weight * (current - own * start))  # type: ignore[operator]
    flat = group.sum(torch.cat([p.reshape(-1) for p in pieces]))
    merged = iter(flat.split([p.numel() for p in pieces]))
    for row, (module, mean0, var0, count0) in enumerate(zip(before.modules, before.means, before.variances, before.counts)):
        decay_all = decays[row] ** counts[row].sum()
        module.running_mean.copy_(decay_all * mean0 + next(merged))  # type: ignore[union-attr]
        module.running_var.copy_(decay_all * var0 + next(merged))  # type: ignore[union-attr]
        module.num_batches_tracked.copy_(count0 + counts[row].sum().long())  # type: ignore[union-attr]


def join(device: torch.device = torch.device("cpu")) -> Group:
    """The process group torchrun describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), joined
    with gloo for CPU parameters and NCCL for CUDA ones; one process without torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Group()
    try:
        rank = int(os.environ["RANK"])
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL runs on the current device: this process's own GPU (LOCAL_RANK)
        if not dist.is_initialized():
            dist.init_process_group(BACKENDS[device.type], rank=rank, world_size=world)
    except (KeyError, ValueError, RuntimeError) as error:  # WORLD_SIZE set without torchrun's other variables
        reason = f"{error} is not set" if isinstance(error, KeyError) else str(error).splitlines()[0]
        raise FsltoolError(f"WORLD_SIZE={world}: cannot join the process group ({reason}); launch with torchrun") from None
    return Group(rank, world)
