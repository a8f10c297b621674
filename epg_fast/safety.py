"""What keeps a long run's work safe besides its checkpoints: one trainer per run directory
(`hold_run_dir`), and no update from a non-finite step (`NonFiniteGuard`)."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import IO

import torch


class RunError(RuntimeError):
    """The run cannot go on; the message is one line."""


def hold_run_dir(run_dir: Path) -> IO:
    """Take the advisory lock <run_dir>/.lock for the life of this process (rank 0 calls it):
    a second trainer on the directory is refused at once, naming the holder. The kernel drops
    the lock when its process dies, so a crashed run never blocks the next one. Keep the
    returned file open."""
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        try:
            holder = json.loads(f.read())
            who = f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
        except (ValueError, KeyError, TypeError):
            who = "another process"
        f.close()
        raise RunError(f"{run_dir} is in use by another trainer ({who}); "
                       f"wait for it to end or use another train.run_dir") from None
    f.truncate(0)
    f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}))
    f.flush()
    return f


class NonFiniteGuard:
    """A step whose loss or updated weights are not finite changes nothing: before the
    forward the guard copies every tensor the step writes (online weights and buffers,
    optimiser state, shadow weights and buffers); after the update it selects, on the
    device, the new values or the copies (torch.where on a finite flag), so a normal step
    adds no host synchronisation. The counters live on the device and are read at logging
    and checkpoint steps (`read`). Costs one copy of those tensors in memory and per step.

    Limits: tensors the optimiser keeps on the host while training on a GPU (torch AdamW's
    step counts, unless fused or capturable) cannot be selected without a sync and still
    advance; the lr schedule advances too. Under several ranks the flag agrees because the
    gradients are all-reduced before the update (a non-finite loss on one rank makes every
    rank's update non-finite); only a rank-local non-finite loss with finite gradients
    would be judged differently. Tested at ZeRO stage 0.

    EPG_TEST_NAN_AT_STEP=S[,S...] (tests only) makes the loss of those steps NaN.
    """

    def __init__(self, engine, shadow: torch.nn.Module, device: torch.device, max_consecutive: int) -> None:
        self.engine, self.shadow, self.device, self.max_consecutive = engine, shadow, device, max_consecutive
        self.total = torch.zeros((), dtype=torch.int64, device=device)
        self.consecutive = torch.zeros((), dtype=torch.int64, device=device)
        self.last_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.tensors: list[torch.Tensor] = []
        self.copies: list[torch.Tensor] = []
        self.reported = 0
        self.settled = False  # until a step creates no new optimiser state
        self.inject_at = {int(s) for s in os.environ.get("EPG_TEST_NAN_AT_STEP", "").split(",") if s.strip()}

    def _written_by_step(self) -> list[torch.Tensor]:
        """Online weights (ZeRO-3: this rank's shard) and buffers (BatchNorm statistics and
        counts, updated by the forward), the tensors of every optimiser level (DeepSpeed's
        wrappers around torch's), shadow weights and buffers."""
        seen, out = set(), []

        def add(t) -> None:
            if torch.is_tensor(t) and t.device == self.device and id(t) not in seen:
                seen.add(id(t))
                out.append(t)  # the object itself (a Parameter's .data is a new one each time)

        for p in self.engine.module.parameters():
            add(getattr(p, "ds_tensor", p))
        for b in self.engine.module.buffers():
            add(b)
        opt = self.engine.optimizer
        while opt is not None:
            for group in getattr(opt, "param_groups", []):
                for p in group["params"]:
                    add(p)
            for state in getattr(opt, "state", {}).values():
                for value in state.values():
                    add(value)
            opt = getattr(opt, "optimizer", None)
        for t in list(self.shadow.parameters()) + list(self.shadow.buffers()):
            add(t)
        return out

    def loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """The step's loss (NaN at the test hook's steps)."""
        return loss * float("nan") if step in self.inject_at else loss

    @torch.no_grad()
    def begin_step(self) -> None:
        tensors = self._written_by_step()  # optimiser state appears at the first step
        if [id(t) for t in tensors] != [id(t) for t in self.tensors]:
            self.tensors, self.copies = tensors, [torch.empty_like(t) for t in tensors]
        torch._foreach_copy_(self.copies, self.tensors)

    @torch.no_grad()
    def end_step(self, loss: torch.Tensor, step: int) -> None:
        weights = [getattr(p, "ds_tensor", p).detach() for p in self.engine.module.parameters()]
        finite = torch.isfinite(loss.detach()).all() & torch.isfinite(torch.stack(torch._foreach_norm(weights)).sum())
        for t, copy in zip(self.tensors, self.copies):
            t.copy_(torch.where(finite, t, copy))
        if not self.settled:  # the optimiser state created by this step (the first) had nothing to copy:
            known = {id(t) for t in self.tensors}  # zeros, AdamW's initial state, stand in for it
            new = [t for t in self._written_by_step() if id(t) not in known]
            for t in new:
                t.copy_(torch.where(finite, t, torch.zeros_like(t)))
            self.settled = not new
        bad = (~finite).to(torch.int64)
        self.total += bad
        self.consecutive.add_(1).mul_(bad)  # reset by a finite step
        self.last_bad.copy_(torch.where(finite, self.last_bad, torch.full_like(self.last_bad, step)))

    def read(self, step: int, log) -> int:
        """The count of non-finite steps so far (a host sync: logging and checkpoint steps
        only); logs new ones, and raises RunError after max_consecutive in a row, before any
        checkpoint of this step is written."""
        total, consecutive, last = (int(v) for v in torch.stack([self.total, self.consecutive, self.last_bad]).tolist())
        if total > self.reported:
            log.warning("non-finite loss or update in %d step(s) up to step %d (last at step %d): "
                        "weights, optimiser and shadow left unchanged", total - self.reported, step, last)
            self.reported = total
        if consecutive >= self.max_consecutive:
            raise RunError(f"step {step}: {consecutive} consecutive non-finite steps (train.max_nonfinite="
                           f"{self.max_consecutive}); stopped without a checkpoint, the last one is untouched "
                           f"(try a lower optim.lr or optim.grad_clip)")
        return total


# Resuming with a changed config: each key is applied (and logged) or refused. Keys under
# these prefixes would not fit the saved weights, optimiser or data state: refused. (Another
# stage or model shape is refused before this, by checkpoint.check_same_model; a change of
# model.kernels, model.attention or model.dropout applies: the model is built from this run's.)
REFUSED_ON_RESUME = ("init.", "train.seed", "train.zero_stage", "optim.decay_tokens")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(saved: dict, current: dict) -> list[tuple[str, object, object]]:
    """(key, saved value, this run's value) of every key that differs, the refused ones
    raising ConfigError (one line naming the key). Keys absent from an older checkpoint's
    config count as unchanged."""
    from epg_fast.config import ConfigError

    old, new = _flat(saved), _flat(current)
    changes = [(k, old[k], new[k]) for k in new if k in old and old[k] != new[k]]
    for key, was, now in changes:
        if key.startswith(REFUSED_ON_RESUME):
            raise ConfigError(f"resuming a checkpoint with {key}={was!r}, this run has {key}={now!r}: "
                              f"it cannot change mid-run (set it back, or use another train.run_dir)")
    return changes


def apply_optimiser_settings(optimizer: torch.optim.Optimizer, scheduler, lr: float, betas: tuple[float, float],
                             weight_decays: list[float]) -> None:
    """This run's lr, betas and weight decay (one per parameter group) on the optimiser and
    lr schedule just restored from a checkpoint, which hold the saved run's values."""
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    for i, (group, decay) in enumerate(zip(optimizer.param_groups, weight_decays, strict=True)):
        group.update(initial_lr=lr, lr=lr * scheduler.lr_lambdas[i](scheduler.last_epoch), betas=betas,
                     weight_decay=decay)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
