"""Digits trained data-parallel, slowed down per step so a test can break the gang mid-epoch.

`slow_train` trains exactly what the built-in `train` stage trains with `workers=2` (same spec, same
seed): a sleep in the loss changes no number, so a recovered run must end with the same weights.
Also loaded by path from the CLI (`tests/training/ddp_workflows.py:sigterm`).
"""

import functools
import time
from dataclasses import replace
from typing import Any

from actors.ddp import DDPConfig
from storage import Tensors
from workflows import Workflow, stage
from workflows.builtin.digits import ddp_spec, preprocess, train_ddp

LR = 5e-3  # a few epochs reach >= 0.9 held-out accuracy


def slowed(loss: Any, delay_s: float, model: Any, batch: Any) -> Any:
    time.sleep(delay_s)
    return loss(model, batch)


def fit(
    ctx: Any, table: Any, epochs: int, delay_s: float, durable_every: int, rescue: bool = True, log: bool = False
) -> Tensors:
    spec = ddp_spec(hidden=128, lr=LR, batch_size=64, epochs=epochs, seed=0, workers=2)
    spec = replace(spec, loss=functools.partial(slowed, spec.loss, delay_s))
    config = DDPConfig(
        workers=2,
        cpus_per_worker=0.5,
        durable_every=durable_every,
        rescue=rescue,
        placement_timeout_s=30,
        log_min_bytes=0 if log else DDPConfig.log_min_bytes,  # digits is small: no gradient log by default
    )
    return train_ddp(ctx, table, spec, config)


@stage(cpus=0.5)
def slow_train(ctx, preprocess: Any, epochs: int = 2, delay_s: float = 0.0, durable_every: int = 0) -> Tensors:
    return fit(ctx, preprocess, epochs, delay_s, durable_every)


@stage(cpus=0.5, resources={"coordinator": 1})
def pinned_train(ctx, preprocess: Any, epochs: int = 2, delay_s: float = 0.0, rescue: bool = True) -> Tensors:
    """The coordinator on the node offering `coordinator`, so removing another node only hits workers.
    Per-step snapshots go through the gradient log, as a large model's would."""
    return fit(ctx, preprocess, epochs, delay_s, 0, rescue, log=True)


def sigterm() -> Workflow:
    return Workflow("ddp_sigterm", [preprocess, slow_train])
