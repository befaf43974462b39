"""A synthetic CPU -> GPU pipeline: a CPU-bound streaming feature stage feeding a training consumer.

`tierflow run pipeline` shows streaming end to end; `benchmarks/pipelining.py` times it against barrier
mode and a hand-written Ray Data script. Both stages have an adjustable cost per shard/batch (busy CPU
time), so the balance between producer and consumer can be set from the command line.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa

from actors.context import StageContext
from actors.streaming import BatchStream, Stream
from storage import Tensors
from workflows.model import Workflow, stage

N_FEATURES = 16


def spin(seconds: float) -> None:
    """Busy the CPU (not sleep): the synthetic cost must compete for cores like real work does."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def make_shard(shard: int, rows: int, cost_s: float, seed: int) -> pa.Table:
    """Deterministic rows per (seed, shard): a label that depends on the first four features."""
    t0 = time.perf_counter()
    rng = np.random.default_rng([seed, shard])
    x = rng.standard_normal((rows, N_FEATURES), dtype=np.float32)
    y = (x[:, :4].sum(axis=1) > 0).astype(np.int64)
    spin(cost_s - (time.perf_counter() - t0))
    return pa.table({**{f"f{i:02d}": x[:, i] for i in range(N_FEATURES)}, "label": y})


class Trainer:
    """One SGD step per batch, padded with busy time to `cost_s`: the consumer's cost per batch."""

    def __init__(self, lr: float, seed: int, device: str = "cpu") -> None:
        import torch  # noqa: PLC0415
        from torch import nn  # noqa: PLC0415

        torch.manual_seed(seed)
        self.torch = torch
        self.device = torch.device(device)
        self.model = nn.Sequential(nn.Linear(N_FEATURES, 32), nn.ReLU(), nn.Linear(32, 2)).to(self.device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=lr)
        self.loss_fn = nn.CrossEntropyLoss()

    def step(self, table: pa.Table, cost_s: float) -> tuple[float, float]:
        t0 = time.perf_counter()
        torch = self.torch
        x = torch.from_numpy(np.stack([table[f"f{i:02d}"].to_numpy() for i in range(N_FEATURES)], axis=1))
        y = torch.from_numpy(table["label"].to_numpy())
        x, y = x.to(self.device), y.to(self.device)
        self.opt.zero_grad()
        logits = self.model(x)
        loss = self.loss_fn(logits, y)
        loss.backward()
        self.opt.step()
        accuracy = float((logits.argmax(1) == y).float().mean())
        spin(cost_s - (time.perf_counter() - t0))
        return loss.item(), accuracy

    def weights(self) -> dict[str, Any]:
        return {k: v.detach().cpu().numpy() for k, v in self.model.state_dict().items()}


@stage(cpus=1, stream=Stream(shards="shards"))
def features(shard: int, shards: int = 24, rows: int = 4096, cost_s: float = 0.5, seed: int = 0) -> pa.Table:
    """CPU feature engineering, one shard per call, on a pool sized from the free CPUs."""
    return make_shard(shard, rows, cost_s, seed)


@stage(cpus=1, gpus=1, fallback="cpu")
def fit(ctx: StageContext, features: BatchStream, cost_s: float = 0.5, lr: float = 0.05, seed: int = 0) -> Tensors:
    """Trains while the features are still being made; on CUDA when Ray gave a GPU and torch sees it."""
    trainer = Trainer(lr, seed, ctx.device)
    accuracy = 0.0
    for step, table in enumerate(features):
        loss, accuracy = trainer.step(table, cost_s)
        ctx.log_metric("loss", loss, step)
    ctx.log_metric("last_batch_accuracy", accuracy)
    return Tensors(trainer.weights(), {"features": str(N_FEATURES)})


pipeline = Workflow("pipeline", [features, fit], description="synthetic CPU features streamed into training")
