"""MLflow "models from code" entry for every tierflow torch model: this file plus safetensors weights.

Loading never unpickles anything: the weights are safetensors, the module is rebuilt by the builder its
contract names (`serving.contract`), imported from the model's `code/` folder (MLflow `code_paths`) when it
is not installed where the model loads. `predict` returns class labels for a classifier (probabilities
with `params={"output": "probabilities"}`), the outputs of a regressor, and for a generator the continuation
of each prompt (a list of strings, or their column; params `max_tokens`, `temperature`, `seed`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel
from safetensors import safe_open
from safetensors.numpy import load_file

from serving.contract import forward, load_any
from serving.generation import PYFUNC_PARAMS, Generator
from storage import Tensors


class TierflowModel(PythonModel):
    def load_context(self, context):  # type: ignore[no-untyped-def]
        path = context.artifacts["weights"]
        with safe_open(path, framework="numpy") as f:
            metadata = f.metadata() or {}
        self.model, self.spec = load_any(Tensors(load_file(path), metadata))  # float or int8-compressed
        self.generator = Generator(self.model, self.spec) if self.spec.task == "generator" else None

    # The np.ndarray hint tells MLflow not to infer a schema from type hints (the signature is explicit).
    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:  # type: ignore[no-untyped-def]
        if self.generator is not None:
            prompts = model_input.iloc[:, 0] if isinstance(model_input, pd.DataFrame) else np.ravel(model_input)
            p = {**PYFUNC_PARAMS, **(params or {})}
            return np.asarray([self.generator.generate(str(x), **p) for x in prompts])
        rows = model_input.to_numpy() if isinstance(model_input, pd.DataFrame) else np.asarray(model_input)
        rows = rows.reshape(1, -1) if rows.ndim == 1 else rows
        if problem := self.spec.input.check(rows.astype(np.float64)):
            raise ValueError(f"model input: {problem}")
        out = forward(self.model, self.spec, rows.astype(self.spec.input.dtype))
        if self.spec.task == "classifier" and (params or {}).get("output", "labels") == "labels":
            return np.asarray(self.spec.labels(out))
        return out


set_model(TierflowModel())
