"""MLflow "models from code" entry: the registered model is this file plus safetensors weights.

Loading never unpickles anything: the weights are safetensors and the code is this file.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel
from safetensors import safe_open
from safetensors.numpy import load_file

from serving.compress import load_any
from serving.model import predict_proba
from storage import Tensors


class TierflowClassifier(PythonModel):
    def load_context(self, context):  # type: ignore[no-untyped-def]
        path = context.artifacts["weights"]
        with safe_open(path, framework="numpy") as f:
            metadata = f.metadata() or {}
        self.model, self.config = load_any(Tensors(load_file(path), metadata))  # float or int8-compressed

    # The np.ndarray hint tells MLflow not to infer a schema from type hints (the signature is explicit).
    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:  # type: ignore[no-untyped-def]
        rows = model_input.to_numpy() if isinstance(model_input, pd.DataFrame) else np.asarray(model_input)
        return predict_proba(self.model, rows.astype(np.float32)).argmax(axis=1)


set_model(TierflowClassifier())
