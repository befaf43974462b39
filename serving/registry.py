"""Register a model bundle in MLflow as a "models from code" pyfunc, only once it loads back and predicts.

The version's model directory holds `serving/pyfunc_model.py` (the code MLflow runs), the weights as an
artifact (`artifacts/model.safetensors`), the builder's own source under `code/` when it is not an installed
package (MLflow `code_paths`: prepended to `sys.path` when the model loads), a signature and an input
example from the training stage's data. Before anything is uploaded, the saved directory is loaded with
`mlflow.pyfunc.load_model` and asked to predict its input example; a failure raises `RegistrationError`
and nothing is logged or registered.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from serving.contract import ModelContractError, ModelSpec, code_of, forward, load_any, write_code
from storage.formats import SAFETENSORS, decode

PYFUNC = Path(__file__).resolve().with_name("pyfunc_model.py")
REQUIREMENTS = ["torch", "safetensors", "numpy", "pandas"]  # plus tierflow itself, which pyfunc_model imports
DIGEST_TAG = "tierflow.digest"


class RegistrationError(ModelContractError):
    """The model was not registered: it could not be saved, loaded back or asked one prediction."""


def expected_output(spec: ModelSpec, proba_or_out: np.ndarray) -> np.ndarray:
    return np.asarray(spec.labels(proba_or_out)) if spec.task == "classifier" else proba_or_out


def smoke_example(module: Any, spec: ModelSpec) -> tuple[Any, np.ndarray, dict[str, Any] | None]:
    """(input example, its expected output, the signature's params): rows for a classifier or regressor;
    for a generator its example prompt and the greedy continuation it must give back."""
    if spec.task == "generator":
        from serving.generation import PYFUNC_PARAMS, Generator  # noqa: PLC0415

        prompt = spec.generation.example_prompt  # type: ignore[union-attr]
        text = Generator(module, spec).generate(prompt, **PYFUNC_PARAMS)
        return [prompt], np.asarray([text]), dict(PYFUNC_PARAMS)
    example = spec.example_rows()
    params = {"output": "labels"} if spec.task == "classifier" else None
    return example, expected_output(spec, forward(module, spec, example)), params


def save_pyfunc(data: bytes, directory: Path) -> tuple[Path, ModelSpec, Any, np.ndarray]:
    """Write the MLflow model for safetensors `data` under `directory`: (model dir, spec, example, output)."""
    import mlflow  # noqa: PLC0415
    from mlflow.models import infer_signature  # noqa: PLC0415

    bundle = decode(SAFETENSORS, data)
    try:
        module, spec = load_any(bundle)
        example, output, params = smoke_example(module, spec)
    except ModelContractError as exc:
        raise RegistrationError(f"the model cannot be rebuilt: {exc}") from None
    except Exception as exc:
        raise RegistrationError(f"the model failed its smoke prediction ({type(exc).__name__}: {exc})") from exc
    weights = directory / "model.safetensors"
    weights.write_bytes(data)
    code_paths = [str(p) for p in write_code(code_of(bundle), directory / "code")]
    model_dir = directory / "model"
    mlflow.pyfunc.save_model(
        path=str(model_dir),
        python_model=str(PYFUNC),
        artifacts={"weights": str(weights)},
        code_paths=code_paths or None,
        pip_requirements=REQUIREMENTS,
        signature=infer_signature(example, output, params=params),
        input_example=example,
        metadata={"tierflow.builder": spec.builder, "tierflow.task": spec.task},
    )
    return model_dir, spec, example, output


def load_back(model_dir: Path, example: Any, expected: np.ndarray) -> None:
    """Load the saved model as a user would and check one prediction; leave sys.path/sys.modules as found."""
    import mlflow  # noqa: PLC0415

    path_before, modules_before = list(sys.path), set(sys.modules)
    try:
        got = np.asarray(mlflow.pyfunc.load_model(str(model_dir)).predict(example))
    except Exception as exc:
        raise RegistrationError(
            f"the saved model does not load back with mlflow.pyfunc.load_model ({type(exc).__name__}: {exc})"
        ) from exc
    finally:
        sys.path[:] = path_before
        for name in set(sys.modules) - modules_before:  # code imported from the temporary model folder
            if str(getattr(sys.modules[name], "__file__", "") or "").startswith(str(model_dir.parent)):
                del sys.modules[name]
    same = got.shape == expected.shape and (
        np.array_equal(got, expected) if expected.dtype.kind in "iuUSO" else np.allclose(got, expected, atol=1e-5)
    )
    if not same:
        raise RegistrationError(f"the loaded model predicts {got.tolist()!r} on its input example, not {expected!r}")


def log_and_register(client: Any, data: bytes, *, model_name: str, digest: str, stage_run_id: str) -> Any:
    """Save, load back, then upload to the stage run and register a version tagged with the weights' digest."""
    import mlflow  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, _, example, output = save_pyfunc(data, Path(tmp))
        load_back(model_dir, example, output)
        client.log_artifacts(stage_run_id, str(model_dir), artifact_path="model")
    try:
        client.create_registered_model(model_name)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{client.get_run(stage_run_id).info.artifact_uri}/model"
    return client.create_model_version(model_name, source=source, run_id=stage_run_id, tags={DIGEST_TAG: digest})
