"""The process group of the trainer and the sampler: one rank per process, started by a
launcher (deepspeed, torchrun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the
environment) or alone; and leaving it so that a finished multi-rank run exits 0, every time.

torch.distributed.destroy_process_group() only drops torch's own references to the
groups. A gloo group lives on while anything else holds it: DeepSpeed keeps a clone of the
world group (deepspeed.utils.groups._WORLD_GROUP), and default arguments evaluated after
init_process_group (torch.distributed.nn.functional's `group=group.WORLD`, imported lazily)
pin the world group for good. Each such group keeps two `pt_gloo_runloop` workers and a
`gloo_tcp_loop` thread, and on rank 0 the world group's TCPStore keeps its server thread
(`pt_tcpstore_uv`). They were then torn down during interpreter shutdown, in no fixed
order and racing the peer's exit, which now and then ended a finished run with
"terminate called without an active exception" (exit 250 from the launcher).
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
import socket
import sys

import torch
import torch.distributed as dist
# Imported here, before any process group exists, so that the `group=group.WORLD` defaults
# of its functions are evaluated to None. Imported later (our projector BatchNorm does, at
# its first forward), they would hold the world group past destroy_process_group for good.
import torch.distributed.nn.functional  # noqa: F401

log = logging.getLogger("epg_fast")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_device(choice: str, error: type[Exception]) -> str:
    """A command line's --device: "auto" is CUDA when visible, else the CPU; "cuda" without a
    visible device raises `error` (the tool's one-line error)."""
    device = choice if choice != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise error("--device cuda, but CUDA is not available")
    return device


def setup_distributed(device: str, *, group_of_one: bool,
                      timeout_minutes: float | None = None) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process, after joining the process group: NCCL on
    CUDA, gloo on the CPU.

    `device` is "auto" (CUDA when visible), "cpu" or "cuda" (the caller has checked that CUDA
    is visible). Under a launcher every rank joins; a process started alone joins a group of
    its own only with `group_of_one` (DeepSpeed needs one, and reads the launcher's variables,
    which are then set for a world of one). `timeout_minutes` bounds every collective (None:
    torch's default): a rank that waits that long for a hung or dead peer raises instead.
    """
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is first imported
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
        if "OMP_NUM_THREADS" not in os.environ and local_ranks > 1:  # ranks sharing the cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))
    if group_of_one:
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 or group_of_one:
        timeout = datetime.timedelta(minutes=timeout_minutes) if timeout_minutes else None
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None, timeout=timeout)
    return rank, world, dev

# Native thread names of gloo process groups and of the TCPStore server.
C10D_THREADS = ("pt_gloo_runloop", "gloo_tcp_loop", "pt_tcpstore_uv")


def c10d_threads() -> list[str]:
    """Names of this process's live gloo / TCPStore threads (Linux; empty elsewhere)."""
    names = []
    for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ():
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended meanwhile
            continue
    return [n for n in names if n in C10D_THREADS]


def teardown_distributed(finished: bool = True) -> list[str]:
    """Destroy every process group and join its threads while the interpreter is whole.
    `finished=False` after an error the caller handled: no barrier (the peers may never come).

    Returns the c10d threads still alive afterwards (empty when the teardown is clean).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return []
    # Every rank arrives before any rank tears down: rank 0 hosts the store, and a peer
    # still inside a collective must not see its partner's sockets vanish. Not while an
    # exception is on its way out (called from a `finally`): the peers may never arrive,
    # and the launcher stops them when this rank fails.
    if finished and dist.get_world_size() > 1 and sys.exc_info()[0] is None:
        dist.barrier()
    ds_comm = sys.modules.get("deepspeed.comm.comm")
    if ds_comm is not None and ds_comm.cdb is not None:
        ds_comm.destroy_process_group()  # torch's destroy + DeepSpeed's cached groups
    else:
        dist.destroy_process_group()
    gc.collect()  # the groups' last references go now, so their destructors join the threads
    left = c10d_threads()
    if left:
        log.warning("process groups still referenced after teardown; live threads: %s", left)
    return left
