"""The sync counter sees every host-device synchronisation pattern, and none in pure tensor code."""

import torch

from epg_fast.syncs import SyncCounter, on_host


def test_scalar_reads_are_counted_one_by_one_with_their_source_line():
    x = torch.randn(4)
    with SyncCounter() as syncs:
        x.sum().item()
        int(x[0] > 0)
        float(x.max())
        if x[1] > 0:  # bool(t)
            pass
    assert syncs.counts() == {"scalar_read": 4}
    assert all("test_syncs.py" in e.where for e in syncs.events)
    assert "x.sum().item()" in syncs.events[0].where


def test_uploads_with_an_explicit_device_count_and_host_tensors_do_not():
    with SyncCounter() as syncs:
        torch.tensor([1, 2, 3], device="cpu")
        torch.as_tensor([0.5], device=torch.device("cpu"))
        torch.tensor([1, 2, 3])  # host tensor, no device: stays on the host on CUDA too
        torch.full((3,), 2.0)  # the fill value is a kernel argument, not a copy
    assert syncs.counts() == {"upload": 2}


def test_pure_tensor_code_counts_zero_forward_and_backward():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
    x = torch.randn(5, 8)
    with SyncCounter() as syncs:
        loss = model(x).square().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)  # stays a tensor
        torch.where(loss > 1, loss, 0 * loss)
    assert syncs.counts() == {}


def test_paused_and_gpu_semantics():
    x = torch.randn(3)
    with SyncCounter() as syncs:
        with syncs.paused():
            x.sum().item()
        x.sum().item()
    assert syncs.counts() == {"scalar_read": 1}
    host_step = torch.zeros(())  # e.g. an optimiser's step counter, on the CPU in a GPU run too
    with SyncCounter() as exempt:
        exempt.treat_as_host([host_step])
        host_step.add_(1)
        host_step.item()
        x.sum().item()
    assert exempt.counts() == {"scalar_read": 1}
    with SyncCounter(cpu_as_device=False) as real:  # on a GPU host tensors cannot sync
        x.sum().item()
        torch.tensor([1.0], device="cpu")
    assert real.counts() == {}


def test_on_host_exempts_host_reads_and_cpu_tensors_only_inside_it():
    gen = torch.Generator().manual_seed(0)
    with SyncCounter() as syncs:
        with on_host():
            int(torch.randint(10, (1,), generator=gen))
            torch.tensor([1.0], device="cpu")
        int(torch.randint(10, (1,), generator=gen))  # outside: a stand-in device read
    assert syncs.counts() == {"scalar_read": 1}
