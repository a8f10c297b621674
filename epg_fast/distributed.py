"""The process group of the trainer and the sampler: one rank per process, started by a
launcher (deepspeed, torchrun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the
environment) or alone."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(device: str, *, group_of_one: bool) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process, after joining the process group: NCCL on
    CUDA, gloo on the CPU.

    `device` is "auto" (CUDA when visible), "cpu" or "cuda" (the caller has checked that CUDA
    is visible). Under a launcher every rank joins; a process started alone joins a group of
    its own only with `group_of_one` (DeepSpeed needs one, and reads the launcher's variables,
    which are then set for a world of one).
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
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return rank, world, dev
