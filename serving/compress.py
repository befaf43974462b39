"""Post-training compression of any tierflow torch model: magnitude pruning, then int8 Linear weights.

Works on every module rebuilt from the model contract (`serving.contract`): `compress` prunes each
`nn.Linear` weight by L1 magnitude (`torch.nn.utils.prune.l1_unstructured`,
made permanent with `prune.remove`) and quantises it exactly as `torch.ao.quantization.quantize_dynamic`
does with its default qconfig: per-tensor qint8 weights (symmetric min/max, so the zero point is 0
and pruned zeros stay exact zeros); activations stay float and are quantised per batch at run time.

The result is still a plain `Tensors` bundle, stored as safetensors with no pickle:

    <linear>.weight_int8        int8  [out, in]
    <linear>.weight_scale       float32 [1]
    <linear>.weight_zero_point  int64 [1]
    <linear>.bias               float32 [out]
    <other parameters/buffers>  their own dtype (Standardize mean / scale, BatchNorm statistics, ...)

(per-tensor scalars are one-element arrays: `storage.formats` stores 0-d arrays as shape [1]), and
the `config` metadata gains `"compression": {"method": "dynamic-int8", "prune_amount": ...}`.
`load_compressed` rebuilds the network from its builder with `torch.ao.nn.quantized.dynamic.Linear` layers that run
on those int8 weights; `load_any` loads either kind of bundle.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune

from serving.contract import ModelContractError, build_module, code_of, load_float, spec_of
from storage import Tensors
from storage.formats import encode

METHOD = "dynamic-int8"


@contextlib.contextmanager
def _quantization_api() -> Iterator[None]:
    """Silence torch's deprecation notices for the eager quantisation API, which still works in torch 2.13."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated", category=Warning)
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions", category=Warning)
        yield


def _config(bundle: Tensors) -> dict[str, Any]:
    if "config" not in bundle.metadata:
        raise ModelContractError(
            "bundle has no 'config' metadata: return the trained model with workflows.torch_model(...)"
        )
    return json.loads(bundle.metadata["config"])


def _quantizable(module: nn.Module) -> bool:
    # exactly nn.Linear: subclasses such as MultiheadAttention's out_proj are read as raw weights by their owner
    return type(module) is nn.Linear


def unsupported(bundle: Tensors) -> str | None:
    """Why `compress` cannot apply to this bundle (say it, and serve the float model), or None."""
    if is_compressed(bundle):
        return "the model is already compressed"
    model, spec = load_float(bundle)
    if spec.input is None:  # its gate is measured on rows (accuracy, latency)
        return f"{spec.builder} is a {spec.task}: int8 compression here measures and serves row models only"
    if not any(_quantizable(m) for m in model.modules()):
        return f"{spec.builder} has no nn.Linear layers; dynamic int8 quantisation applies only to Linear weights"
    if spec.input.dtype != "float32":
        return f"int8 Linear layers take float32 input; this model takes {spec.input.dtype}"
    return None


def is_compressed(bundle: Tensors) -> bool:
    return "compression" in _config(bundle)


def prune_linear(model: nn.Module, amount: float) -> nn.Module:
    """Zero the `amount` fraction of smallest-magnitude weights of every Linear, in place and permanently."""
    if not 0.0 <= amount < 1.0:
        raise ValueError(f"prune_amount={amount!r} must be in [0, 1)")
    for module in model.modules():
        if _quantizable(module):
            prune.l1_unstructured(module, name="weight", amount=amount)
            prune.remove(module, "weight")
    return model


def quantize_weight(weight: torch.Tensor) -> torch.Tensor:
    """A qint8 per-tensor tensor with the qparams `quantize_dynamic`'s default qconfig would choose."""
    from torch.ao.quantization import default_dynamic_qconfig  # noqa: PLC0415

    with _quantization_api():
        observer = default_dynamic_qconfig.weight()
        observer(weight.detach().float())
        scale, zero_point = observer.calculate_qparams()
        return torch.quantize_per_tensor(weight.detach().float(), float(scale), int(zero_point), torch.qint8)


def compress(bundle: Tensors, *, prune_amount: float = 0.3) -> Tensors:
    """Prune, then int8-quantise the Linear weights of a float bundle (any module the contract rebuilds)."""
    if is_compressed(bundle):
        raise ValueError("bundle is already compressed; compress the original float weights instead")
    if not 0.0 <= prune_amount < 1.0:
        raise ValueError(f"prune_amount={prune_amount!r} must be in [0, 1)")
    if reason := unsupported(bundle):
        raise ModelContractError(f"cannot compress: {reason}")
    model, _ = load_float(bundle)
    config = _config(bundle)
    prune_linear(model, prune_amount)
    tensors: dict[str, np.ndarray] = {}
    total = zeros = 0
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if _quantizable(module):
            q = quantize_weight(module.weight)
            int8 = q.int_repr().numpy().copy()
            tensors[f"{prefix}weight_int8"] = int8
            tensors[f"{prefix}weight_scale"] = np.array([q.q_scale()], dtype=np.float32)
            tensors[f"{prefix}weight_zero_point"] = np.array([q.q_zero_point()], dtype=np.int64)
            if module.bias is not None:
                tensors[f"{prefix}bias"] = module.bias.detach().numpy().astype(np.float32)
            total += int8.size
            zeros += int(np.count_nonzero(int8 == q.q_zero_point()))
            continue
        for key, value in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if key in module._non_persistent_buffers_set:  # not in state_dict: rebuilt by the builder
                continue
            tensors[f"{prefix}{key}"] = value.detach().cpu().numpy().copy()
    config["compression"] = {
        "method": METHOD,
        "prune_amount": float(prune_amount),
        "weight_dtype": "qint8",
        "weight_qscheme": "per_tensor_affine",
        "weight_sparsity": round(zeros / total, 6) if total else 0.0,
    }
    return Tensors(tensors, {**bundle.metadata, "config": json.dumps(config)})


def compress_if_supported(bundle: Tensors, *, prune_amount: float = 0.3) -> tuple[Tensors, str | None]:
    """(the int8 bundle, None), or (`bundle` unchanged, why int8 does not apply to this model)."""
    if reason := unsupported(bundle):
        return bundle, reason
    return compress(bundle, prune_amount=prune_amount), None


def load_compressed(bundle: Tensors) -> nn.Module:
    """The network of a compressed bundle, its Linear layers running on the stored int8 weights."""
    import torch.ao.nn.quantized.dynamic as nnqd  # noqa: PLC0415

    config = _config(bundle)
    method = (config.get("compression") or {}).get("method")
    if method != METHOD:
        raise ValueError(f"bundle compression method is {method!r}; this loader handles {METHOD!r}")
    if torch.backends.quantized.engine == "none":
        raise RuntimeError("this torch build has no quantized engine; cannot run int8 weights")
    arrays = bundle.numpy()
    model = build_module(spec_of(bundle), code_of(bundle))
    used: set[str] = set()

    def take(key: str, dtype: Any) -> torch.Tensor:
        if key not in arrays:
            raise ValueError(f"compressed bundle is missing {key!r}")
        value = arrays[key]
        if value.dtype != dtype:
            raise ValueError(f"compressed bundle: {key!r} is {value.dtype}, expected {np.dtype(dtype)}")
        used.add(key)
        return torch.from_numpy(np.array(value))

    for name, module in list(model.named_modules()):
        prefix = f"{name}." if name else ""
        if _quantizable(module):
            int8 = take(f"{prefix}weight_int8", np.int8)
            if tuple(int8.shape) != (module.out_features, module.in_features):
                raise ValueError(
                    f"compressed bundle: {prefix}weight_int8 has shape {tuple(int8.shape)}, "
                    f"expected {(module.out_features, module.in_features)}"
                )
            scale = _scalar(take(f"{prefix}weight_scale", np.float32), f"{prefix}weight_scale")
            zero_point = int(_scalar(take(f"{prefix}weight_zero_point", np.int64), f"{prefix}weight_zero_point"))
            bias = take(f"{prefix}bias", np.float32) if module.bias is not None else None
            with _quantization_api():
                qweight = torch._make_per_tensor_quantized_tensor(int8, scale, zero_point)
                qlinear = nnqd.Linear(module.in_features, module.out_features, dtype=torch.qint8)
                qlinear.set_weight_bias(qweight, bias)
            model.set_submodule(name, qlinear)
            continue
        for key, value in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if key in module._non_persistent_buffers_set:
                continue
            with torch.no_grad():
                stored = take(f"{prefix}{key}", torch.empty(0, dtype=value.dtype).numpy().dtype)
                value.copy_(stored.reshape(value.shape))
    unknown = sorted(set(arrays) - used)
    if unknown:
        raise ValueError(f"compressed bundle has tensors this network does not use: {unknown}")
    return model.eval()


def _scalar(value: torch.Tensor, key: str) -> float:
    if value.numel() != 1:
        raise ValueError(f"compressed bundle: {key!r} has shape {tuple(value.shape)}, expected one value (per-tensor)")
    return value.item()


def load_any(bundle: Tensors) -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, config dict) for a float bundle or a compressed one (`serving.contract.load_any`
    gives the parsed `ModelSpec` instead)."""
    if is_compressed(bundle):
        return load_compressed(bundle), _config(bundle)
    return load_float(bundle)[0], _config(bundle)


def measure(
    model_or_bundle: nn.Module | Tensors,
    x_raw: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int = 64,
    runs: int = 50,
    warmup: int = 5,
) -> dict[str, Any]:
    """Accuracy on (x_raw, y), safetensors size of a bundle, median CPU latency of one batch.

    `size_bytes` is the length of `storage.formats.encode(bundle)` and is None when a bare module is
    given. Latency is the median over `runs` forward passes of `batch_size` rows (rows are repeated
    if there are fewer), in ms, after `warmup` passes, using whatever `torch.get_num_threads()` the
    caller set (reported as `threads`).
    """
    x = np.asarray(x_raw, dtype=np.float32)
    y = np.asarray(y)
    if x.ndim != 2 or len(x) == 0 or len(x) != len(y):
        raise ValueError(f"need x of shape [n, features] with n > 0 and len(y) == n; got {x.shape} and {y.shape}")
    if isinstance(model_or_bundle, Tensors):
        model, _ = load_any(model_or_bundle)
        size_bytes: int | None = len(encode(model_or_bundle)[1])
    else:
        model, size_bytes = model_or_bundle.eval(), None
    batch = torch.from_numpy(np.resize(x, (batch_size, x.shape[1])))
    times_ms = []
    with torch.inference_mode():
        accuracy = float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())
        for _ in range(warmup):
            model(batch)
        for _ in range(runs):
            start = time.perf_counter()
            model(batch)
            times_ms.append((time.perf_counter() - start) * 1000.0)
    return {
        "accuracy": accuracy,
        "size_bytes": size_bytes,
        "latency_ms": statistics.median(times_ms),
        "batch_size": batch_size,
        "runs": runs,
        "threads": torch.get_num_threads(),
    }
