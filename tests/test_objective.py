"""The pre-training objective (spec section 3): NCE against an independent numpy formula,
the two-rank NCE against the single-process one, and the full loss against a naive
composition of separate network calls."""

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from epg_fast.distributed import teardown_distributed
from epg_fast.models.encoder import PretrainEncoder
from epg_fast.objectives.pretrain import levels, nce, pretrain_loss


def nce_numpy(u: np.ndarray, v: np.ndarray, tau: float) -> np.ndarray:
    u = u / np.linalg.norm(u, axis=1, keepdims=True)
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    out = []
    for i in range(len(u)):
        s = np.array([u[i] @ v[j] / tau for j in range(len(v))])
        out.append(math.log(np.exp(s).sum()) - s[i])
    return np.array(out)


def test_nce_matches_formula():
    rng = np.random.default_rng(0)
    u, v = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    got = nce(torch.tensor(u, dtype=torch.float32), torch.tensor(v, dtype=torch.float32), 0.2)
    np.testing.assert_allclose(got.numpy(), nce_numpy(u, v, 0.2), rtol=1e-5, atol=1e-5)


def test_nce_no_gradient_into_v():
    u = torch.randn(4, 3, requires_grad=True)
    v = torch.randn(4, 3, requires_grad=True)
    nce(u, v, 0.1).mean().backward()
    assert u.grad is not None and u.grad.abs().sum() > 0
    assert v.grad is None


def _two_rank_worker(rank: int, init_file: str, u: torch.Tensor, v: torch.Tensor, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    half = u.shape[0] // 2
    u_local = u[rank * half : (rank + 1) * half].clone().requires_grad_(True)
    loss = nce(u_local, v[rank * half : (rank + 1) * half], 0.2).mean()
    loss.backward()
    # data parallel: the global loss and gradient are the means over ranks
    out[rank] = (loss.detach(), u_local.grad.clone())
    teardown_distributed()


def test_nce_two_ranks_equals_single_process(tmp_path):
    torch.manual_seed(0)
    u, v = torch.randn(8, 6), torch.randn(8, 6)
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_two_rank_worker, args=(str(tmp_path / "init"), u, v, out), nprocs=2, join=True)
    u_single = u.clone().requires_grad_(True)
    single = nce(u_single, v, 0.2).mean()
    single.backward()
    two_rank_loss = (out[0][0] + out[1][0]) / 2
    torch.testing.assert_close(two_rank_loss, single.detach(), atol=1e-6, rtol=1e-6)
    # each rank's gradient, averaged over ranks as DeepSpeed does, is the single-process gradient
    torch.testing.assert_close(torch.cat([out[0][1], out[1][1]]) / 2, u_single.grad, atol=1e-7, rtol=1e-5)


def test_levels_are_adjacent_shifted_grid_points():
    lv = levels(5, 41, 256)
    grid = [4 * (80 ** (1 / 7) + i / 40 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7 for i in range(41)]
    assert (lv.t_n, lv.t_next, lv.t0) == pytest.approx((grid[5], grid[6], 4 * 0.002))


def _nets():
    torch.manual_seed(0)
    args = dict(image_size=16, patch_size=4, dim=32, depth=2, heads=2, proj_hidden=64, proj_dim=16)
    online, target = PretrainEncoder(**args).train(), PretrainEncoder(**args).eval()
    return online, target


def test_pretrain_loss_equals_naive_composition():
    online, target = _nets()
    torch.manual_seed(1)
    x, y1, y2, e = (torch.randn(6, 3, 16, 16) for _ in range(4))
    lv = levels(7, 21, 16)
    loss, parts = pretrain_loss(online, target, x, y1, y2, e, lv)
    loss.backward()
    grads = [p.grad.clone() for p in online.parameters()]
    online.zero_grad()

    def full(v):
        return torch.full((6,), v)

    # spec section 3, written out: one separate call per input, numpy NCE
    z1 = online(y1 + lv.t0 * e, full(lv.t0))[0]
    z2 = online(y2 + lv.t0 * e, full(lv.t0))[0]
    h_b = online(x + lv.t_n * e, full(lv.t_n))[1]
    with torch.no_grad():
        zt1 = target(y1 + lv.t0 * e, full(lv.t0))[0]
        zt2 = target(y2 + lv.t0 * e, full(lv.t0))[0]
        h_next = online(x + lv.t_next * e, full(lv.t_next))[1]
    lc = nce_numpy(z1.detach().numpy(), zt2.numpy(), 0.2) + nce_numpy(z2.detach().numpy(), zt1.numpy(), 0.2)
    lrc = nce_numpy(h_b.detach().numpy(), h_next.numpy(), 0.1)
    assert float(parts["contrastive"]) == pytest.approx(lc.mean(), rel=1e-4)
    assert float(parts["consistency"]) == pytest.approx(lrc.mean(), rel=1e-4)
    assert loss.item() == pytest.approx((lc + lrc).mean(), rel=1e-4)
    naive = (nce(z1, zt2, 0.2) + nce(z2, zt1, 0.2) + nce(h_b, h_next, 0.1)).mean()
    naive.backward()
    for g, p in zip(grads, online.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-4)
    for p in target.parameters():
        assert p.grad is None


def test_detach_variant_gives_the_same_loss_and_gradients():
    """consistency_target='detach' (the reference: graph built, then detached) = 'no_grad'."""
    results = []
    for mode in ("no_grad", "detach"):
        online, target = _nets()
        torch.manual_seed(1)
        x, y1, y2, e = (torch.randn(4, 3, 16, 16) for _ in range(4))
        loss, _ = pretrain_loss(online, target, x, y1, y2, e, levels(3, 41, 16), consistency_target=mode)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in online.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


class TwoProjections(torch.nn.Module):
    """The online network as it was before the b/b' projector passes: z for the projected
    views only (PretrainEncoder.forward with project_rest forced off)."""

    def __init__(self, net: PretrainEncoder) -> None:
        super().__init__()
        self.net = net

    def forward(self, x_t, t, views=1, projected=1, project_rest=False):
        return self.net(x_t, t, views, projected)


def _bn_running_stats(online: PretrainEncoder, inputs: list, momentum: float = 0.1) -> list:
    """The reference's projector BatchNorm running statistics after its four projector calls
    (a1, a2, b, b' in this order, each a separate training-mode batch), written out in
    float64 from BatchNorm's definition: batch mean / biased variance normalise, the running
    mean / unbiased variance move by `momentum` from (0, 1)."""
    ph = online.projection_head
    lin0, bn1, lin3, bn4 = (m.weight.detach().double() for m in (ph[0], ph[1], ph[3], ph[4]))
    b1, b4 = ph[1].bias.detach().double(), ph[4].bias.detach().double()
    state = {1: [torch.zeros(64, dtype=torch.float64), torch.ones(64, dtype=torch.float64)],
             4: [torch.zeros(64, dtype=torch.float64), torch.ones(64, dtype=torch.float64)]}

    def bn(u, gamma, beta, idx):
        mean, var = u.mean(0), u.var(0, unbiased=False)
        n = u.shape[0]
        rm, rv = state[idx]
        state[idx] = [(1 - momentum) * rm + momentum * mean, (1 - momentum) * rv + momentum * var * n / (n - 1)]
        return (u - mean) / torch.sqrt(var + 1e-5) * gamma + beta

    with torch.no_grad():
        for x_t, t in inputs:
            h = online.features(x_t, torch.full((x_t.shape[0],), t)).double()
            u = torch.relu(bn(h @ lin0.T, bn1, b1, 1))
            bn(u @ lin3.T, bn4, b4, 4)
    return [*state[1], *state[4]]


@pytest.mark.parametrize("mode", ["no_grad", "detach"])
def test_online_projector_statistics_see_all_four_inputs(mode):
    """As the reference, the online projector runs on a1, a2, b and b' every step (four
    BatchNorm updates, in this order); the loss and gradients are bit-identical to projecting
    only a1 and a2."""
    online, target = _nets()
    two = TwoProjections(PretrainEncoder(image_size=16, patch_size=4, dim=32, depth=2, heads=2,
                                         proj_hidden=64, proj_dim=16).train())
    two.net.load_state_dict(online.state_dict())
    torch.manual_seed(1)
    x, y1, y2, e = (torch.randn(6, 3, 16, 16) for _ in range(4))
    lv = levels(7, 21, 16)
    with torch.no_grad():
        want = _bn_running_stats(two.net, [(y1 + lv.t0 * e, lv.t0), (y2 + lv.t0 * e, lv.t0),
                                           (x + lv.t_n * e, lv.t_n), (x + lv.t_next * e, lv.t_next)])
    results = []
    for net in (online, two):
        loss, _ = pretrain_loss(net, target, x, y1, y2, e, lv, consistency_target=mode)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in net.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
    ph = online.projection_head
    got = [ph[1].running_mean, ph[1].running_var, ph[4].running_mean, ph[4].running_var]
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-6)
    assert int(ph[1].num_batches_tracked) == int(ph[4].num_batches_tracked) == 4
    assert int(two.net.projection_head[1].num_batches_tracked) == 2  # the old behaviour: a1, a2 only
