"""Find a workflow by built-in name, `path/to/file.py:object` or `package.module:object`."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path

from ray import cloudpickle

from workflows.errors import WorkflowLoadError
from workflows.model import Workflow

BUILTINS = {
    "digits": "workflows.builtin.digits:digits",
    "pipeline": "workflows.builtin.pipeline:pipeline",
    "textgen": "workflows.builtin.textgen:textgen",
}


def load_workflow(ref: str) -> Workflow:
    target = BUILTINS.get(ref, ref)
    if ":" not in target:
        raise WorkflowLoadError(
            f"unknown workflow {ref!r}: use a built-in ({', '.join(sorted(BUILTINS))}), "
            "path/to/file.py:workflow or package.module:workflow"
        )
    where, _, attr = target.rpartition(":")
    module = _load_file(where) if where.endswith(".py") else _load_module(where)
    obj = getattr(module, attr, None)
    if obj is None:
        raise WorkflowLoadError(f"{where} has no attribute {attr!r}")
    if callable(obj) and not isinstance(obj, Workflow):
        obj = obj()
    if not isinstance(obj, Workflow):
        raise WorkflowLoadError(f"{target} is a {type(obj).__name__}, not a workflows.Workflow")
    return obj


def _load_module(name: str):  # type: ignore[no-untyped-def]
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise WorkflowLoadError(f"cannot import {name!r}: {exc}") from exc


def _load_file(path_text: str):  # type: ignore[no-untyped-def]
    path = Path(path_text).resolve()
    if not path.is_file():
        raise WorkflowLoadError(f"workflow file {path_text!r} does not exist")
    name = "tierflow_user_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise WorkflowLoadError(f"cannot load {path_text!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    # Ray workers cannot import this file by name: ship its functions by value instead.
    cloudpickle.register_pickle_by_value(module)
    return module
