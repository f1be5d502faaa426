"""The processes of an ablation grid started by `accelerate launch --num_processes N -m heads.ablate`.

Each process (rank) trains whole joint groups, on its own device (`cuda:<local rank>` when the machine has
GPUs, else the CPU), and the ranks meet at two barriers: after every rank has read which runs are finished
(so no rank sees another's fresh files), and before rank 0 writes the result tables. accelerate's
`PartialState` forms the process group (gloo on CPU, NCCL on GPUs) and works for multi-node launches too.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from cache.command_kit.errors import AvbError

# A rank that finished its groups waits at the final barrier for the slowest rank; a grid can take hours.
BARRIER_TIMEOUT = timedelta(days=7)


class LaunchError(AvbError):
    """The launched processes did not form the process group they were launched as."""


@dataclass
class GridProcesses:
    """This process's place in the grid: `rank` of `world`, `local_rank` on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    _state: object | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def provenance(self) -> dict[str, str]:
        """What a run's metrics.json records of the process that trained it (nothing for a one-process grid)."""
        return {"process": f"{self.rank} of {self.world}"} if self.world > 1 else {}

    def barrier(self) -> None:
        if self._state is not None:
            self._state.wait_for_everyone()

    def device(self, requested: torch.device) -> torch.device:
        """The device for this rank: CUDA without an index (what `auto` and `cuda` resolve to) is this rank's own
        GPU; anything else is taken as given."""
        if self.world > 1 and requested.type == "cuda" and requested.index is None:
            return torch.device("cuda", self.local_rank % torch.cuda.device_count())
        return requested


def grid_processes() -> GridProcesses:
    """The launch this process belongs to; a plain `avb heads ablate` is one process and forms no group."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return GridProcesses()
    from accelerate import PartialState  # noqa: PLC0415 - only multi-process grids need it

    state = PartialState(cpu=not torch.cuda.is_available(), timeout=BARRIER_TIMEOUT)
    if state.num_processes != world:
        raise LaunchError(f"{world} processes were launched (WORLD_SIZE={world}) but accelerate formed a group "
                           f"of {state.num_processes}; check the accelerate config of this machine")
    if "OMP_NUM_THREADS" not in os.environ and not torch.cuda.is_available():
        # N processes on one machine's CPUs: share its cores instead of each taking all of them
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world) or world)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    return GridProcesses(state.process_index, world, state.local_process_index, state)


def assign_groups(costs: list[float], world: int) -> list[list[int]]:
    """Deterministic work split: group indices per rank, longest first onto the least loaded rank.

    The classic LPT rule (ties: the earlier group, the lower rank), so every rank computes the same split
    from the same grid, and an expensive BRANCH group does not land on a rank already holding another.
    """
    loads = [0.0] * world
    out: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        out[rank].append(i)
        loads[rank] += costs[i]
    return [sorted(groups) for groups in out]
