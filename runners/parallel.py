"""Data-parallel evaluation of one run: the processes of ``accelerate launch`` (or ``torchrun``) split its samples.

    accelerate launch --num_processes 8 -m runners.evaluate model=llava_next_7b benchmark=gqa ...

Every process reads the launcher's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, set by ``torch.distributed.run``, which ``accelerate launch`` drives), loads
its own copy of the model on its own GPU(s), and computes a strided shard of the samples that are
not done yet (``todo[rank::world_size]``, as lmms-eval shards). Work is keyed by sample id: a
rerun, with any number of processes, shards whatever is left. The processes meet three times over a
gloo process group (CPU tensors, so the same on a CPU or a GPU node; only small objects are sent):

1. the main process (rank 0) opens the run store (lock, identity, leftover shards merged) and tells
   the others whether the run was accepted; they join it as members of the same launch;
2. every process has read which samples are done before any process writes;
3. every process has finished its shard before the main process merges the shards and writes the
   summary.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from runners.store import (
    CorruptRunError,
    RunLock,
    RunLockedError,
    RunMismatchError,
    RunStore,
    RunStoreError,
    launch_token,
)
from vtclab.errors import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")
# A collective waits this long for the slowest process (a shard of a big benchmark on a slow GPU):
# torchrun stops every process when one dies, so a long timeout never leaves a launch hanging.
COLLECTIVE_TIMEOUT = timedelta(hours=12)
REFUSALS = {cls.__name__: cls for cls in (RunLockedError, RunMismatchError, CorruptRunError, RunStoreError)}


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place in a launch; ``world_size == 1`` is an ordinary single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> "ProcessGroup":
        """The group ``torch.distributed.run`` (behind ``accelerate launch``) describes in the environment."""
        env = os.environ if environ is None else environ
        world = int(env.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        group = cls(rank=int(env["RANK"]), world_size=world, local_rank=int(env.get("LOCAL_RANK", env["RANK"])),
                    local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)))
        if not 0 <= group.rank < world:
            raise ConfigError(f"RANK={group.rank} is outside WORLD_SIZE={world}")
        return group

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This process's strided share: ``items[rank::world_size]``."""
        return list(items[self.rank::self.world_size])

    def _ensure_initialised(self) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", rank=self.rank, world_size=self.world_size, timeout=COLLECTIVE_TIMEOUT)

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            self._ensure_initialised()
            dist.barrier()

    def broadcast(self, value: T) -> T:
        """The main process's ``value``, in every process."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        self._ensure_initialised()
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def open_run_store(directory: Path, identity: Mapping[str, Any], *, resume: bool, group: ProcessGroup,
                   order: Sequence[str], wait: bool = False) -> RunStore:
    """The run's store, opened by every process of a launch as one run.

    The main process opens it as a single-process run would (lock, identity, leftover shards merged
    into ``samples.jsonl``), under a token unique to this launch, then sends the outcome: the
    others join under that token, or raise the same refusal, so no process waits for a partner
    that has given up. After this returns, every process has read which samples are done.

    ``wait``: a run directory in use is waited for instead of refused. A sweep's jobs ask for it:
    under a parallel launcher two jobs that are one run (``none`` at every ratio of a ratio sweep)
    can start together, and the second then finds the first one's results when it gets the lock.
    """
    if not group.distributed:
        while True:
            try:
                return RunStore(directory, identity, resume=resume, order=order)
            except RunLockedError:
                if not wait:
                    raise
                log.info("%s is in use by another process (in a sweep: another job of the same run); waiting for "
                         "it to end", directory)
                if not RunLock(directory, "").wait():  # not the run lock (a shard still written): no waiting
                    raise
    if group.is_main:
        token = f"{launch_token()}#{uuid.uuid4().hex[:12]}"
        try:
            store = RunStore(directory, identity, resume=resume, order=order, token=token, rank=0)
        except RunStoreError as error:
            group.broadcast((type(error).__name__, str(error)))
            raise
        except BaseException as error:  # noqa: BLE001  (tell the others, then fail as this process would)
            group.broadcast(("RunStoreError", f"the main process failed to open {directory}: {error!r}"))
            raise
        group.broadcast(("ok", token))
    else:
        kind, message = group.broadcast(("", ""))
        if kind != "ok":
            raise REFUSALS.get(kind, RunStoreError)(message)
        store = RunStore.join(directory, identity, token=message, rank=group.rank)
    group.barrier()  # every process has joined before any computes
    return store


def process_model_settings(model: Mapping[str, Any], group: ProcessGroup, gpus: int | None = None) -> dict[str, Any]:
    """``model`` settings for this process: in a data-parallel launch, each process on its own GPU(s).

    With at least one GPU per process on the node, process ``local_rank`` gets GPUs
    ``[local_rank * k, (local_rank + 1) * k)``, ``k = GPUs // processes``: ``cuda:<first>`` when
    ``k == 1``, else ``device_map=auto`` with ``max_memory`` naming only those GPUs (a model that
    does not fit one GPU spreads over its own). On a CPU-only node (or for the embedded model,
    which runs on the CPU) nothing changes. ``gpus``: the node's GPU count (default: torch's).
    """
    settings = dict(model)
    if not group.distributed or settings.get("loader") != "local" or settings.get("device_map") == "cpu":
        return settings
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 0:
        settings["device_map"] = "cpu"
        return settings
    if not (settings.get("device_map") in (None, "auto") or isinstance(settings.get("device_map"), str)):
        raise ConfigError(f"model.device_map={settings['device_map']!r} places one process's model; in a data-parallel "
                          "launch every process picks its own GPUs: use model.device_map=auto")
    per_process = gpus // group.local_world_size
    if per_process < 1:
        raise ConfigError(f"{group.local_world_size} processes on {socket.gethostname()} but {gpus} GPUs: launch at "
                          f"most one process per GPU (accelerate launch --num_processes {gpus})")
    mine = list(range(group.local_rank * per_process, (group.local_rank + 1) * per_process))
    if per_process == 1 or settings.get("random_init"):  # a random-init model is built on one device
        settings["device_map"] = f"cuda:{mine[0]}"
    else:
        settings["device_map"] = "auto"
        settings["max_memory"] = {index: _gpu_memory(index) for index in mine}
    log.info("process %d of %d: model on GPU(s) %s", group.rank, group.world_size, mine)
    return settings


def _gpu_memory(index: int) -> int:
    import torch

    return int(torch.cuda.get_device_properties(index).total_memory)
