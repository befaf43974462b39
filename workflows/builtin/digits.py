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
from serving.config import ModelSource, ServeConfig
from storage import Tensors
from workflows.errors import GateFailed
from workflows.model import Workflow, stage

N_FEATURES = 64
_SERVE = ServeConfig()  # the serve stage's defaults are ServeConfig's


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
    """The served artifact: the trained body behind a Standardize layer holding the scaler."""
    import torch  # noqa: PLC0415

    from serving.model import to_tensors  # noqa: PLC0415

    mean, scale = _scaler(preprocess)
    model[0].mean.copy_(torch.from_numpy(mean))
    model[0].scale.copy_(torch.from_numpy(scale))
    return to_tensors(
        model,
        {
            "layers": layers,
            "standardize": True,
            "classes": list(range(10)),
            "input": "64 raw pixel intensities (0-16) of an 8x8 digit",
        },
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
    return x * scale + mean, y


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

    from serving.compress import compress as compress_bundle  # noqa: PLC0415
    from serving.compress import measure  # noqa: PLC0415

    if max_accuracy_drop < 0:
        raise ValueError(f"max_accuracy_drop={max_accuracy_drop!r} must be >= 0")
    candidate = compress_bundle(train, prune_amount=prune_amount)
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


@stage(cpus=0.25, cache=False, inputs={"model": "compress"})
def serve(
    ctx: StageContext,
    preprocess: pa.Table,
    model: Tensors,
    evaluate: dict[str, float],
    app_name: str = _SERVE.app_name,
    host: str = _SERVE.host,
    port: int = _SERVE.port,
    replica_cpus: float = _SERVE.num_cpus,
    replica_gpus: float = _SERVE.num_gpus,
    replica_accelerator_type: str | None = _SERVE.accelerator_type,
    replica_fallback: str | None = "cpu",
    min_replicas: int = _SERVE.min_replicas,
    max_replicas: int = _SERVE.max_replicas,
    target_ongoing_requests: float = _SERVE.target_ongoing_requests,
    upscale_delay_s: float = _SERVE.upscale_delay_s,
    downscale_delay_s: float = _SERVE.downscale_delay_s,
    max_batch_size: int = _SERVE.max_batch_size,
    batch_wait_timeout_s: float = _SERVE.batch_wait_timeout_s,
    max_ongoing_requests: int = _SERVE.max_ongoing_requests,
    max_queued_requests: int | None = _SERVE.max_queued_requests,
    canary_share: float = _SERVE.canary_share,
) -> dict[str, Any]:
    """Roll the evaluated model out on Ray Serve (blue/green, optional canary); answer with the URL.

    Replicas are placed like stages: `replica_gpus` (fractions allowed) and `replica_accelerator_type` are
    honoured where a node has them, else the replica falls back to CPU (`replica_fallback=None` refuses
    instead). `min_replicas < max_replicas` turns on Serve autoscaling around `target_ongoing_requests`.
    """
    from serving.rollout import Rollout  # noqa: PLC0415

    facts = ctx.upstream["model"]
    lineage = {k.removeprefix("tierflow."): v for k, v in facts.items() if k.startswith("tierflow.model")}
    lineage |= {"training_run": facts.get("run_id", ""), "tierflow_run": ctx.run_id}
    source = ModelSource(
        digest=facts["digest"],
        version=facts.get("tierflow.model_version", ""),
        model_name=facts.get("tierflow.model_name", ""),
        artifact=ctx.input_refs["model"],
        store_config=ctx.store_config,
        lineage=lineage,
    )
    config = ServeConfig(
        app_name=app_name,
        host=host,
        port=port,
        num_cpus=replica_cpus,
        num_gpus=replica_gpus,
        accelerator_type=replica_accelerator_type,
        fallback=replica_fallback if replica_gpus else None,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        target_ongoing_requests=target_ongoing_requests,
        upscale_delay_s=upscale_delay_s,
        downscale_delay_s=downscale_delay_s,
        max_batch_size=max_batch_size,
        batch_wait_timeout_s=batch_wait_timeout_s,
        max_ongoing_requests=max_ongoing_requests,
        max_queued_requests=max_queued_requests,
    )
    rollout = Rollout(ctx.store_config, config)
    url = rollout.deploy(source, canary_share=canary_share)  # type: ignore[arg-type]
    ctx.set_tag("tierflow.endpoint", url)
    ctx.set_tag("tierflow.replica_resources", json.dumps(rollout.replica_options, sort_keys=True))
    direct = rollout.direct_urls()  # [] unless the cluster runs Serve with direct ingress
    x, y = _raw_test_rows(preprocess)
    return {
        "url": url,
        "predict_url": f"{url}/predict",
        "direct_predict_urls": [f"{u}/predict" for u in direct],
        "app_name": app_name,
        "replica_resources": rollout.replica_options,
        "accuracy": evaluate["accuracy"],
        "model_digest": facts["digest"],
        "example": {"instances": [x[0].round(4).tolist()]},
        "example_label": int(y[0]),
        **lineage,
    }


digits = Workflow(
    "digits",
    [preprocess, train, evaluate, compress, serve],
    description="scikit-learn digits: preprocess -> train (GPU or CPU) -> evaluate -> compress (int8) -> serve",
)
