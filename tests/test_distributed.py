"""Teardown of the process group (issue 16): after teardown_distributed no gloo or TCPStore
thread is left to be torn down during interpreter shutdown."""

import os
import socket

import torch
import torch.multiprocessing as mp

from epg_fast.distributed import c10d_threads, teardown_distributed
from epg_fast.models.encoder import ProjectorBatchNorm


def _rank(rank: int, port: int, out: dict) -> None:
    os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed
    from deepspeed.utils import groups

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False,
                               init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    groups._clone_world_group()  # what deepspeed.initialize does: a second gloo group, cached
    ProjectorBatchNorm(4).train()(torch.randn(3, 4)).sum().backward()  # the trainer's all-reduce
    before = c10d_threads()
    out[rank] = (before, teardown_distributed())


def test_teardown_joins_every_gloo_and_store_thread():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_rank, args=(port, out), nprocs=2, join=True)
    for rank in (0, 1):
        before, after = out[rank]
        assert before.count("pt_gloo_runloop") == 4 and before.count("gloo_tcp_loop") == 2  # two groups
        assert after == [], f"rank {rank}: threads left after teardown: {after}"
    assert "pt_tcpstore_uv" in out[0][0]  # rank 0 hosted the store, and it is gone too
