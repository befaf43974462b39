"""The main job: scikit-learn digits -> preprocess (CPU) -> train (GPU, CPU fallback) -> evaluate
(accuracy gate) -> compress (int8, accuracy-drop gate) -> serve (Ray Serve). The data set ships with
scikit-learn: no download."""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from actors.context import StageContext
from storage import Tensors
from workflows.errors import GateFailed
from workflows.model import Workflow, stage
from workflows.serve_stage import serve_model

N_FEATURES = 64


def _features(table: pa.Table, split: str) -> tuple[np.ndarray, np.ndarray]:
    rows = table.filter(pc.equal(table["split"], split))
    x = np.stack([rows[f"px{i:02d}"].to_numpy() for i in range(N_FEATURES)], axis=1).astype(np.float32)
    return x, rows["label"].to_numpy().astype(np.int64)


def _scaler(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    meta = table.schema.metadata or {}
    return (
        np.asarray(json.loads(meta[b"scaler_mean"]), np.float32),
        np.asarray(json.loads(meta[b"scaler_scale"]), np.float32),
    )


@stage(cpus=1)
def preprocess(ctx: StageContext, test_fraction: float = 0.2, seed: int = 0) -> pa.Table:
    """Standardise the 8x8 images with statistics of the training split; keep a held-out split."""
    from sklearn.datasets import load_digits  # noqa: PLC0415
    from sklearn.model_selection import train_test_split  # noqa: PLC0415
    from sklearn.preprocessing import StandardScaler  # noqa: PLC0415

    x, y = load_digits(return_X_y=True)
    raw = hashlib.sha256(np.ascontiguousarray(x).tobytes() + np.ascontiguousarray(y).tobytes()).hexdigest()
    ctx.log_source("sklearn-digits", "sklearn.datasets.load_digits", raw, num_rows=len(y))
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=test_fraction, random_state=seed, stratify=y)
    scaler = StandardScaler().fit(x[idx_train])
    order = np.concatenate([idx_train, idx_test])
    scaled = scaler.transform(x[order]).astype(np.float32)
    columns: dict[str, Any] = {f"px{i:02d}": scaled[:, i] for i in range(N_FEATURES)}
    columns["label"] = y[order].astype(np.int64)
    columns["split"] = ["train"] * len(idx_train) + ["test"] * len(idx_test)
    table = pa.table(columns).replace_schema_metadata(
        {
            "scaler_mean": json.dumps(scaler.mean_.tolist()),
            "scaler_scale": json.dumps(scaler.scale_.tolist()),
            "source_sha256": raw,
        }
    )
    ctx.log_metrics({"rows_train": len(idx_train), "rows_test": len(idx_test)})
    return table


@stage(cpus=1, gpus=1, fallback="cpu", register_model="tierflow-digits")
def train(
    ctx: StageContext,
    preprocess: pa.Table,
    epochs: int = 30,
    lr: float = 1e-3,
    batch_size: int = 64,
    hidden: int = 128,
    seed: int = 0,
    workers: int = 1,
    worker_cpus: float = 0.5,
    durable_every: int = 0,
    snapshot_every: int = 1,
) -> Tensors:
    """A small MLP; uses CUDA when the actor was given a GPU and torch can see it.

    `workers > 1` trains data-parallel (torch DDP, gloo) on a gang of that many actors with
    just-in-time snapshots (actors.ddp); `batch_size` stays the global batch. `snapshot_every=0` keeps
    only the survivors' hand-over at a failure (near-free for steps this short).
    """
    import torch  # noqa: PLC0415
    from torch import nn  # noqa: PLC0415

    from serving.model import build_mlp  # noqa: PLC0415

    if workers > 1:
        from actors.ddp import DDPConfig  # noqa: PLC0415

        spec = ddp_spec(hidden=hidden, lr=lr, batch_size=batch_size, epochs=epochs, seed=seed, workers=workers)
        config = DDPConfig(
            workers=workers, cpus_per_worker=worker_cpus, durable_every=durable_every, snapshot_every=snapshot_every
        )
        return train_ddp(ctx, preprocess, spec, config)
    torch.manual_seed(seed)
    device = torch.device(ctx.device)
    x, y = _features(preprocess, "train")
    xt, yt = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    layers = [N_FEATURES, hidden, 10]
    # The served model carries the scaler as its first layer; training sees already-scaled rows.
    model = build_mlp(layers, standardize=True)
    body = model[1:].to(device)
    opt = torch.optim.Adam(body.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    step = 0
    for epoch in range(epochs):
        perm = torch.randperm(len(xt), generator=gen).to(device)
        correct = 0
        for i in range(0, len(xt), batch_size):
            batch = perm[i : i + batch_size]
            opt.zero_grad()
            logits = body(xt[batch])
            loss = loss_fn(logits, yt[batch])
            loss.backward()
            opt.step()
            correct += int((logits.argmax(1) == yt[batch]).sum())
            ctx.log_metric("loss", loss.item(), step)
            step += 1
        ctx.log_metric("train_accuracy", correct / len(xt), epoch)
    return _bundle(model.cpu(), preprocess, layers)


def _bundle(model: Any, preprocess: pa.Table, layers: list[int]) -> Tensors:
    """The served artifact (the model contract): the trained body behind a Standardize layer holding the
    scaler, rebuilt by `serving.model:build_mlp`; it takes raw pixel intensities 0-16."""
    import torch  # noqa: PLC0415

    from serving.contract import InputSpec, torch_model  # noqa: PLC0415

    mean, scale = _scaler(preprocess)
    model[0].mean.copy_(torch.from_numpy(mean))
    model[0].scale.copy_(torch.from_numpy(scale))
    x, y = _raw_test_rows(preprocess)
    return torch_model(
        model,
        builder="serving.model:build_mlp",
        args={"layers": layers, "standardize": True},
        task="classifier",
        classes=list(range(10)),
        input=InputSpec(N_FEATURES, min=0, max=16),
        example=x[:5],
        example_target=y[:5],
        info={"layers": layers, "standardize": True, "description": "64 raw pixel intensities (0-16) of an 8x8 digit"},
    )


# -- data-parallel training (train.workers > 1); module-level functions so workers can load them ---
def _digits_body(layers: list[int]) -> Any:
    from serving.model import build_mlp  # noqa: PLC0415

    return build_mlp(layers, standardize=True)[1:]  # keeps the served model's parameter names


def _adam(params: Any, lr: float) -> Any:
    import torch  # noqa: PLC0415

    return torch.optim.Adam(params, lr=lr)


def _xy(shard: pa.Table) -> tuple[Any, Any]:
    import torch  # noqa: PLC0415

    x = np.stack([shard[f"px{i:02d}"].to_numpy() for i in range(N_FEATURES)], axis=1).astype(np.float32)
    return torch.from_numpy(x), torch.from_numpy(shard["label"].to_numpy().astype(np.int64))


def _cross_entropy(model: Any, batch: Any) -> Any:
    import torch  # noqa: PLC0415

    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def ddp_spec(*, hidden: int, lr: float, batch_size: int, epochs: int, seed: int, workers: int) -> Any:
    """The digits MLP as an `actors.ddp.TrainSpec`; `batch_size` is global (split across workers)."""
    from actors.ddp import TrainSpec  # noqa: PLC0415

    return TrainSpec(
        build_model=functools.partial(_digits_body, [N_FEATURES, hidden, 10]),
        build_optimizer=functools.partial(_adam, lr=lr),
        prepare=_xy,
        loss=_cross_entropy,
        epochs=epochs,
        batch_size=max(1, -(-batch_size // workers)),
        seed=seed,
    )


def train_ddp(ctx: StageContext, preprocess: pa.Table, spec: Any, config: Any) -> Tensors:
    """Train `spec` data-parallel on the training split and bundle it like the single-process path."""
    import torch  # noqa: PLC0415

    from actors.ddp import train_data_parallel  # noqa: PLC0415
    from serving.model import build_mlp  # noqa: PLC0415

    rows = preprocess.filter(pc.equal(preprocess["split"], "train"))  # shards then split only training rows
    result = train_data_parallel(ctx, rows, spec, config)
    layers = list(spec.build_model.args[0])
    model = build_mlp(layers, standardize=True)
    model[1:].load_state_dict({k: torch.from_numpy(v) for k, v in result.state.items()})
    return _bundle(model, preprocess, layers)


def _raw_test_rows(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    x, y = _features(table, "test")
    mean, scale = _scaler(table)
    return np.round(x * scale + mean), y  # raw pixels are whole numbers 0-16; rounding undoes float error


@stage(cpus=1, gate=True)
def evaluate(ctx: StageContext, preprocess: pa.Table, train: Tensors, threshold: float = 0.9) -> dict[str, float]:
    """Accuracy of the exact artifact that will be served, on the held-out split; a gate."""
    from serving.compress import load_any  # noqa: PLC0415
    from serving.model import predict_proba  # noqa: PLC0415

    model, _ = load_any(train)
    x, y = _raw_test_rows(preprocess)
    accuracy = float((predict_proba(model, x).argmax(1) == y).mean())
    ctx.log_metric("accuracy", accuracy)
    if accuracy < threshold:
        raise GateFailed(f"accuracy {accuracy:.4f} is below the threshold {threshold}; the model is not served")
    return {"accuracy": accuracy, "threshold": threshold, "test_rows": len(y)}


@stage(cpus=1, register_model="tierflow-digits", gate=True)
def compress(
    ctx: StageContext,
    preprocess: pa.Table,
    train: Tensors,
    evaluate: dict[str, float],
    prune_amount: float = 0.3,
    max_accuracy_drop: float = 0.01,
) -> Tensors:
    """Prune + int8-quantise the evaluated model; keep it only if held-out accuracy drops by <= max_accuracy_drop.

    Otherwise the original weights pass through unchanged (same digest, so no new registry version).
    """
    import torch  # noqa: PLC0415

    from serving.compress import compress_if_supported, measure  # noqa: PLC0415

    if max_accuracy_drop < 0:
        raise ValueError(f"max_accuracy_drop={max_accuracy_drop!r} must be >= 0")
    candidate, unsupported = compress_if_supported(train, prune_amount=prune_amount)
    if unsupported:  # a model int8 cannot apply to passes through, and says why
        ctx.set_tag("tierflow.compression", f"unsupported: {unsupported}")
        return train
    x, y = _raw_test_rows(preprocess)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # comparable latencies; restored because the actor may run other stages
    try:
        before, after = measure(train, x, y), measure(candidate, x, y)
    finally:
        torch.set_num_threads(threads)
    drop = before["accuracy"] - after["accuracy"]
    for key in ("accuracy", "size_bytes", "latency_ms"):
        ctx.log_metric(f"{key}_before", before[key])
        ctx.log_metric(f"{key}_after", after[key])
    ctx.log_metrics({"accuracy_drop": drop, "size_ratio": after["size_bytes"] / before["size_bytes"]})
    applied = drop <= max_accuracy_drop + 1e-9  # accuracies are multiples of 1/len(y)
    ctx.set_tag("tierflow.compression", "applied" if applied else "rejected")
    return candidate if applied else train


# the library serve stage, as a user's workflow ends: the compressed (or passed-through) model, after its gate
serve = serve_model("compress", after=["evaluate"])


digits = Workflow(
    "digits",
    [preprocess, train, evaluate, compress, serve],
    description="scikit-learn digits: preprocess -> train (GPU or CPU) -> evaluate -> compress (int8) -> serve",
)
