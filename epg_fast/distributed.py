"""Leaving the process group so that a finished multi-rank run exits 0, every time.

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

import gc
import logging
import os
import sys

import torch.distributed as dist
# Imported here, before any process group exists, so that the `group=group.WORLD` defaults
# of its functions are evaluated to None. Imported later (our projector BatchNorm does, at
# its first forward), they would hold the world group past destroy_process_group for good.
import torch.distributed.nn.functional  # noqa: F401

log = logging.getLogger("epg_fast")

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


def teardown_distributed() -> list[str]:
    """Destroy every process group and join its threads while the interpreter is whole.

    Returns the c10d threads still alive afterwards (empty when the teardown is clean).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return []
    # Every rank arrives before any rank tears down: rank 0 hosts the store, and a peer
    # still inside a collective must not see its partner's sockets vanish. Not while an
    # exception is on its way out (called from a `finally`): the peers may never arrive,
    # and the launcher stops them when this rank fails.
    if dist.get_world_size() > 1 and sys.exc_info()[0] is None:
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
