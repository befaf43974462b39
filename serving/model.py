"""The digits MLP (`build_mlp`, a builder like any user's) and helpers kept for bundles written before the
model contract (`to_tensors` with a `layers` config); `serving.contract` loads both kinds."""

from __future__ import annotations

import itertools
import json
from typing import Any

import numpy as np
import torch
from torch import nn

from storage import Tensors


class Standardize(nn.Module):
    """(x - mean) / scale with the preprocessing statistics as buffers, so they ship in the weights."""

    def __init__(self, n_features: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("scale", torch.ones(n_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale


def build_mlp(layers: list[int], *, standardize: bool = False) -> nn.Sequential:
    """`[64, 128, 10]` -> [Standardize] Linear(64,128) ReLU Linear(128,10)."""
    if len(layers) < 2 or any(int(n) <= 0 for n in layers):
        raise ValueError(f"layers={layers!r}: need at least input and output sizes, all positive")
    mods: list[nn.Module] = [Standardize(int(layers[0]))] if standardize else []
    for i, (a, b) in enumerate(itertools.pairwise(layers)):
        mods.append(nn.Linear(int(a), int(b)))
        if i < len(layers) - 2:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


def to_tensors(model: nn.Module, config: dict[str, Any]) -> Tensors:
    """Weights plus a JSON config in the safetensors metadata."""
    return Tensors({k: v.detach().cpu() for k, v in model.state_dict().items()}, {"config": json.dumps(config)})


def from_tensors(bundle: Tensors) -> tuple[nn.Module, dict[str, Any]]:
    """(module in eval mode, config dict) of a float bundle, rebuilt from its builder."""
    from serving.contract import load_float  # noqa: PLC0415

    model, _ = load_float(bundle)
    return model, json.loads(bundle.metadata["config"])


@torch.inference_mode()
def predict_proba(model: nn.Module, rows: np.ndarray, device: str = "cpu") -> np.ndarray:
    x = torch.as_tensor(np.require(rows, requirements="W"), dtype=torch.float32, device=device)  # may be read-only
    return torch.softmax(model(x), dim=1).cpu().numpy()
