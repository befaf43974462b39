"""The model contract: a trained model is its weights (safetensors) plus a recipe to rebuild it.

A training stage returns `torch_model(module, builder=..., args=..., task=..., input=..., example=...)`:
a `storage.Tensors` bundle holding the module's `state_dict()` (parameters *and* buffers, e.g. BatchNorm
running statistics) and, in its `config` metadata, a JSON `ModelSpec`:

- `builder`: an importable `module:qualname` (function or class) that `builder(**args)` returns the module;
- `task`: `classifier` (outputs logits; predictions are probabilities and a label), `regressor`, or
  `generator` (a language model: made by `serving.generation.generator_model`, whose request is text);
- `input`: the request schema (`InputSpec`: width, dtype, optional range) that serving enforces (none for a
  generator: its `generation` facts, `GenerationSpec`, say what it takes instead);
- `example`: a few real input rows, the MLflow input example and the rollout's smoke request.

When the builder's module is not part of an installed package (a workflow file, a module next to it) its
source travels in the bundle's `code` metadata, so a Serve replica or an MLflow load can import it with no
pickle: the code is text, the weights are tensors. `load_any` rebuilds any bundle, `forward` runs it.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import inspect
import json
import math
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any

import numpy as np

from serving.validation import InvalidInput, check_values
from storage import Tensors

FORMAT = "tierflow.torch/1"
TASKS = ("classifier", "regressor", "generator")
DTYPES = ("float32", "float64", "int64")
CONFIG_KEY, CODE_KEY = "config", "code"
MAX_EXAMPLE_ROWS = 5
_FRAMEWORK = ("actors", "serving", "storage", "workflows")  # tierflow's own packages: installed where it runs
_ROOT = Path(__file__).resolve().parent.parent
_SPEC_KEYS = ("format", "builder", "args", "task", "input", "outputs", "classes", "example", "example_target")
_SPEC_KEYS += ("generation",)  # a generator's tokenizer, context and example prompt


class ModelContractError(ValueError):
    """A model does not meet the contract (or cannot be rebuilt); the message says what to change."""


@dataclass(frozen=True)
class InputSpec:
    """What one request row must be: `width` values of `dtype`, each in [min, max] when declared."""

    width: int
    dtype: str = "float32"
    min: float | None = None
    max: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.width, bool) or not isinstance(self.width, int) or self.width < 1:
            raise ModelContractError(f"InputSpec.width={self.width!r}: the number of input features, an int >= 1")
        if self.dtype not in DTYPES:
            raise ModelContractError(f"InputSpec.dtype={self.dtype!r}: use one of {DTYPES}")
        for name in ("min", "max"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int | float) and math.isfinite(value)):
                raise ModelContractError(f"InputSpec.{name}={value!r}: a finite number or None")
        if self.min is not None and self.max is not None and self.min >= self.max:
            raise ModelContractError(f"InputSpec range [{self.min}, {self.max}] is empty; need min < max")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InputSpec:
        return cls(int(data["width"]), data.get("dtype", "float32"), data.get("min"), data.get("max"))

    def check(self, rows: np.ndarray) -> str | None:
        """Why `rows` do not fit this spec (a message that says the fix), or None when they do.

        The same rules the endpoint applies to a request (`serving.validation`), so an example row a
        model was registered with is one its endpoint accepts.
        """
        if rows.ndim != 2 or rows.shape[1] != self.width:
            return f"each instance must have exactly {self.width} features; got shape {list(rows.shape)}"
        try:
            check_values(np.asarray(rows, dtype=np.float64), self)
        except InvalidInput as exc:
            return exc.message
        return None


@dataclass(frozen=True)
class GenerationSpec:
    """What a generator (task `generator`) takes and emits: text through `tokenizer`, ids in [0, vocab_size).

    `bytes`: ids 0-255 are the UTF-8 bytes of the text, `eos_id` (256) ends a sequence. `max_context` is the
    most tokens (prompt + generated) the model is meant to see; `state_batch_dim` is the batch dimension of
    the tensors of its recurrent state (1 for a GRU's h of shape [layers, B, hidden]).
    """

    tokenizer: str
    vocab_size: int
    eos_id: int
    max_context: int
    example_prompt: str
    state_batch_dim: int = 1

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GenerationSpec:
        return cls(
            tokenizer=str(data["tokenizer"]),
            vocab_size=int(data["vocab_size"]),
            eos_id=int(data["eos_id"]),
            max_context=int(data["max_context"]),
            example_prompt=str(data["example_prompt"]),
            state_batch_dim=int(data.get("state_batch_dim", 1)),
        )


@dataclass(frozen=True)
class ModelSpec:
    """How to rebuild and call a model; stored as JSON in the bundle's `config` metadata."""

    builder: str
    task: str
    input: InputSpec | None  # None for a generator: its request is text (see `generation`)
    outputs: int
    args: dict[str, Any] = field(default_factory=dict)
    classes: list[Any] | None = None
    example: list[list[float]] = field(default_factory=list)
    example_target: list[Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)  # free-form JSON facts, kept at the top level
    compression: dict[str, Any] | None = None
    generation: GenerationSpec | None = None

    def to_config(self) -> dict[str, Any]:
        body = {k: v for k, v in asdict(self).items() if k not in ("info", "compression", "generation")}
        clash = sorted(set(self.info) & {*_SPEC_KEYS, "compression"})
        if clash:
            raise ModelContractError(f"info keys {clash} are reserved by the model contract; rename them")
        out = {**self.info, **body, "format": FORMAT}
        if self.compression:
            out["compression"] = self.compression
        if self.generation is not None:
            out["generation"] = asdict(self.generation)
        return out

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelSpec:
        if "builder" not in config:
            return _legacy(config)
        info = {k: v for k, v in config.items() if k not in (*_SPEC_KEYS, "compression")}
        return cls(
            builder=config["builder"],
            task=config["task"],
            input=InputSpec.from_dict(config["input"]) if config.get("input") else None,
            outputs=int(config["outputs"]),
            args=dict(config.get("args") or {}),
            classes=config.get("classes"),
            example=config.get("example") or [],
            example_target=config.get("example_target"),
            info=info,
            compression=config.get("compression"),
            generation=GenerationSpec.from_dict(config["generation"]) if config.get("generation") else None,
        )

    def row_input(self) -> InputSpec:
        """The row schema of a classifier or regressor; a generator has none (it takes text)."""
        if self.input is None:
            raise ModelContractError(
                f"{self.builder} is a {self.task}: it takes text, not rows; "
                "load it with serving.generation.load_generator"
            )
        return self.input

    def example_rows(self) -> np.ndarray:
        spec_in = self.row_input()
        if self.example:
            return np.asarray(self.example, dtype=spec_in.dtype)
        lo = 0.0 if spec_in.min is None else spec_in.min
        return np.full((1, spec_in.width), lo, dtype=spec_in.dtype)

    def labels(self, proba: np.ndarray) -> list[Any]:
        idx = proba.argmax(axis=1)
        return [self.classes[i] for i in idx] if self.classes else idx.tolist()


def _legacy(config: Mapping[str, Any]) -> ModelSpec:
    """Bundles written before the contract (`serving.model.to_tensors` with `layers`): the digits MLP."""
    if "layers" not in config:
        raise ModelContractError(
            "bundle config has neither a builder nor layers: return the model with workflows.torch_model(...)"
        )
    layers = [int(n) for n in config["layers"]]
    info = {k: v for k, v in config.items() if k not in ("compression", "classes")}
    return ModelSpec(
        builder="serving.model:build_mlp",
        task="classifier",
        input=InputSpec(layers[0]),
        outputs=layers[-1],
        args={"layers": layers, "standardize": bool(config.get("standardize"))},
        classes=config.get("classes"),
        info=info,
        compression=config.get("compression"),
    )


# -- code references --------------------------------------------------------------------------------
def _is_installed(path: Path) -> bool:
    """Code the loading process has anyway: tierflow's own packages, site-packages, the standard library."""
    if any(path.is_relative_to(_ROOT / pkg) for pkg in _FRAMEWORK):
        return True
    roots = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    return any(path.is_relative_to(r) for r in roots) or "site-packages" in path.parts


def _defining_file(obj: Any) -> Path | None:
    code = getattr(obj, "__code__", None)
    if code is None and inspect.isclass(obj):  # a class: any function defined in its body
        code = next((f.__code__ for f in vars(obj).values() if hasattr(f, "__code__")), None)
    return Path(code.co_filename).resolve() if code is not None else None


def code_reference(builder: str | Callable[..., Any]) -> tuple[str, list[dict[str, str]]]:
    """(`module:qualname`, source files to ship) for a builder given by reference or as the object itself."""
    if isinstance(builder, str):
        module_name, _, qualname = builder.partition(":")
        if not module_name or not qualname:
            raise ModelContractError(f"builder {builder!r}: write it as 'package.module:function_or_class'")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ModelContractError(
                f"code reference {builder!r} is not importable ({type(exc).__name__}: {exc}); put its module on "
                "PYTHONPATH or next to the workflow file, or pass the class/function itself as builder="
            ) from None
        _attr(module, qualname, builder)
        path = Path(module.__file__).resolve() if getattr(module, "__file__", None) else None
        return builder, ([] if path is None or _is_installed(path) else _ship(module_name, path))
    if not callable(builder):
        raise ModelContractError(f"builder={builder!r}: pass 'module:function', a function or an nn.Module class")
    qualname = getattr(builder, "__qualname__", "")
    if not qualname or "<locals>" in qualname or "<lambda>" in qualname:
        raise ModelContractError(
            f"builder {qualname or builder!r} is defined inside a function (or is a lambda) and cannot be imported "
            "when the model loads; define it at the top level of a module"
        )
    module_name = builder.__module__
    path = _defining_file(builder)
    if module_name == "__main__" or module_name.startswith("tierflow_user_") or not _importable(module_name, path):
        # a workflow file loaded by path (or a script): ship it and import it by its file name
        if path is None or not path.is_file():
            raise ModelContractError(f"builder {qualname!r}: cannot find the file that defines it to ship with it")
        module_name = path.stem
        if not module_name.isidentifier():
            raise ModelContractError(f"{path.name}: rename the file to a valid module name to ship it with the model")
        if (other := _installed_elsewhere(module_name, path)) is not None:
            raise ModelContractError(
                f"{path.name}: an installed module of the same name ({other}) would be imported instead of it "
                "where the model loads; rename the file"
            )
        return f"{module_name}:{qualname}", [{"path": path.name, "source": path.read_text()}]
    ref = f"{module_name}:{qualname}"
    return ref, ([] if path is None or _is_installed(path) else _ship(module_name, path))


def _importable(module_name: str, path: Path | None) -> bool:
    """`module_name` imports from the file that defines the builder (a function shipped by value to a Ray
    worker keeps its module's name even where that module was never imported)."""
    if module_name in sys.modules:
        return True
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return False
    return spec is not None and spec.origin is not None and path is not None and Path(spec.origin).resolve() == path


def _installed_elsewhere(module_name: str, path: Path) -> str | None:
    """Where `module_name` imports from other than `path`'s folder (e.g. pynvml installs a top-level
    `example.py`): shipped code is imported only when the name is not importable already."""
    folders = [p for p in sys.path if Path(p or ".").resolve() != path.parent]
    try:
        spec = importlib.machinery.PathFinder.find_spec(module_name, folders)
    except (ImportError, ValueError):
        return None
    if spec is None and module_name in sys.builtin_module_names:
        return "a built-in module"
    return None if spec is None else str(spec.origin or module_name)


def _ship(module_name: str, path: Path) -> list[dict[str, str]]:
    """The module's file plus the `__init__.py` of each enclosing package, laid out as they import."""
    is_pkg = path.name == "__init__.py"
    root = path.parents[len(module_name.split(".")) - (0 if is_pkg else 1)]
    files = {path}
    folder = path.parent.parent if is_pkg else path.parent
    while folder != root and folder.is_relative_to(root):
        if (folder / "__init__.py").is_file():
            files.add(folder / "__init__.py")
        folder = folder.parent
    return [{"path": f.relative_to(root).as_posix(), "source": f.read_text()} for f in sorted(files)]


def _attr(module: Any, qualname: str, ref: str) -> Any:
    obj = module
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ModelContractError(
                f"code reference {ref!r}: module {module.__name__!r} has no {qualname!r}"
            ) from None
    return obj


def code_of(bundle: Tensors) -> list[dict[str, str]]:
    return json.loads(bundle.metadata.get(CODE_KEY, "[]"))


def write_code(files: Sequence[Mapping[str, str]], directory: Path) -> list[Path]:
    """Lay the shipped files out under `directory`; return its top-level entries (MLflow `code_paths`)."""
    tops = set()
    for f in files:
        rel = Path(f["path"])
        if rel.is_absolute() or ".." in rel.parts:
            raise ModelContractError(f"shipped code path {f['path']!r} must be relative and stay inside its folder")
        target = directory / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(f["source"])
        tops.add(directory / rel.parts[0])
    return sorted(tops)


def _materialise(files: Sequence[Mapping[str, str]]) -> Path:
    """A private folder per distinct set of shipped files (written once, renamed into place atomically)."""
    digest = sha256(json.dumps(list(files), sort_keys=True).encode()).hexdigest()[:16]
    parent = Path(tempfile.gettempdir()) / "tierflow-code"
    where = parent / digest
    if not where.is_dir():
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{digest}-", dir=parent))
        write_code(files, tmp)
        with contextlib.suppress(OSError):  # another process laid it out first: the same content
            tmp.rename(where)
    return where


def resolve(ref: str, files: Sequence[Mapping[str, str]] = ()) -> Callable[..., Any]:
    """The builder named by `ref`: imported as installed, else from the code shipped with the model."""
    module_name, _, qualname = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as first:
        if not files:
            raise ModelContractError(
                f"code reference {ref!r} is not importable here ({type(first).__name__}: {first}) and no code "
                "was shipped with the model; install the module where the model loads"
            ) from None
        where = _materialise(files)
        if str(where) not in sys.path:
            sys.path.insert(0, str(where))
        importlib.invalidate_caches()
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ModelContractError(
                f"code reference {ref!r} is not importable even with the code shipped with the model "
                f"({type(exc).__name__}: {exc}); a module it imports is missing where the model loads"
            ) from None
    builder = _attr(module, qualname, ref)
    if not callable(builder):
        raise ModelContractError(f"code reference {ref!r} is a {type(builder).__name__}, not a function or class")
    return builder


# -- building and calling ---------------------------------------------------------------------------
def spec_of(bundle: Tensors) -> ModelSpec:
    if CONFIG_KEY not in bundle.metadata:
        raise ModelContractError(
            "bundle has no 'config' metadata: a training stage must return its model with "
            "workflows.torch_model(module, builder=..., task=..., input=..., example=...)"
        )
    return ModelSpec.from_config(json.loads(bundle.metadata[CONFIG_KEY]))


def build_module(spec: ModelSpec, files: Sequence[Mapping[str, str]] = ()) -> Any:
    from torch import nn  # noqa: PLC0415

    builder = resolve(spec.builder, files)
    try:
        module = builder(**spec.args)
    except Exception as exc:
        raise ModelContractError(
            f"{spec.builder}(**{spec.args!r}) raised {type(exc).__name__}: {exc}; the args recorded with the model "
            "must rebuild the same architecture"
        ) from exc
    if not isinstance(module, nn.Module):
        raise ModelContractError(f"{spec.builder}(**args) returned a {type(module).__name__}, not a torch nn.Module")
    return module


def load_float(bundle: Tensors) -> tuple[Any, ModelSpec]:
    """Rebuild the module of a float bundle and load every stored tensor into it (strictly)."""
    import torch  # noqa: PLC0415

    spec = spec_of(bundle)
    module = build_module(spec, code_of(bundle))
    state = {k: torch.from_numpy(np.array(v)) for k, v in bundle.tensors.items()}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelContractError(
            f"the weights do not fit {spec.builder}(**{spec.args!r}): {exc}".strip()[:2000]
        ) from None
    return module.eval(), spec


def load_any(bundle: Tensors) -> tuple[Any, ModelSpec]:
    """(module in eval mode, spec) for a float bundle or an int8-compressed one."""
    from serving.compress import is_compressed, load_compressed  # noqa: PLC0415

    if is_compressed(bundle):
        return load_compressed(bundle), spec_of(bundle)
    return load_float(bundle)


def torch_dtype(dtype: str) -> Any:
    import torch  # noqa: PLC0415

    return {"float32": torch.float32, "float64": torch.float64, "int64": torch.int64}[dtype]


def forward(module: Any, spec: ModelSpec, rows: np.ndarray, device: str = "cpu") -> np.ndarray:
    """Class probabilities [n, C] for a classifier (softmax of logits, or sigmoid of one logit), else the
    regression outputs [n] or [n, k], as float32 numpy."""
    import torch  # noqa: PLC0415

    spec_in = spec.row_input()
    with torch.inference_mode():
        # Rows from Ray's object store are read-only; torch warns on (and cannot safely wrap) those.
        x = torch.as_tensor(np.require(rows, requirements="W"), dtype=torch_dtype(spec_in.dtype), device=device)
        out = module(x)
        if not isinstance(out, torch.Tensor):
            raise ModelContractError(f"the module returned a {type(out).__name__}; forward must return one tensor")
        out = out.float()
        if spec.task == "classifier":
            if out.ndim == 2 and out.shape[1] >= 2:
                out = torch.softmax(out, dim=1)
            elif out.ndim == 1 or (out.ndim == 2 and out.shape[1] == 1):
                p = torch.sigmoid(out.reshape(-1))
                out = torch.stack([1 - p, p], dim=1)
            else:
                raise ModelContractError(
                    f"a classifier must return logits of shape [n, classes] or [n, 1]; got {list(out.shape)}"
                )
        elif out.ndim == 2 and out.shape[1] == 1:
            out = out.reshape(-1)
        return out.cpu().numpy()


def torch_model(
    module: Any,
    *,
    builder: str | Callable[..., Any],
    task: str,
    input: InputSpec | int,  # reads as the contract's word: the model's input
    example: Any,
    args: Mapping[str, Any] | None = None,
    classes: Sequence[Any] | None = None,
    example_target: Any = None,
    info: Mapping[str, Any] | None = None,
) -> Tensors:
    """A trained torch module as a pickle-free bundle a training stage returns (see the module docstring).

    The bundle is checked here, inside the stage: the builder must be importable (or shippable), `builder(**args)`
    must accept the weights, and one forward pass on `example` must give outputs of the declared `task`.
    """
    from torch import nn  # noqa: PLC0415

    if not isinstance(module, nn.Module):
        raise ModelContractError(f"torch_model needs a torch nn.Module, got {type(module).__name__}")
    if task == "generator":
        raise ModelContractError(
            "task='generator': a generator takes text, not rows; return it with serving.generation.generator_model("
            "module, builder=..., args=..., max_context=..., example_prompt=...)"
        )
    if task not in TASKS:
        raise ModelContractError(
            f"task={task!r}: use 'classifier' (logits -> probabilities), 'regressor', or generator_model(...)"
        )
    spec_in = InputSpec(input) if isinstance(input, int) and not isinstance(input, bool) else input
    if not isinstance(spec_in, InputSpec):
        raise ModelContractError(f"input={input!r}: pass the number of features or an InputSpec")
    try:
        json_args = json.loads(json.dumps(dict(args or {}), allow_nan=False))
        json_info = json.loads(json.dumps(dict(info or {}), allow_nan=False))
        json_classes = None if classes is None else json.loads(json.dumps(list(classes)))
    except (TypeError, ValueError) as exc:
        raise ModelContractError(
            f"args, classes and info must be JSON-serialisable (plain numbers/strings): {exc}"
        ) from None
    rows = np.asarray(example.detach().cpu().numpy() if hasattr(example, "detach") else example)
    rows = rows.reshape(1, -1) if rows.ndim == 1 else rows
    rows = rows[:MAX_EXAMPLE_ROWS].astype(spec_in.dtype)
    if len(rows) == 0 or (problem := spec_in.check(rows)):
        raise ModelContractError(f"example: {problem or 'give at least one row'} (it must be real model input)")
    target = None
    if example_target is not None:
        values = example_target.detach().cpu().numpy() if hasattr(example_target, "detach") else example_target
        target = np.asarray(values)[: len(rows)].tolist()
    ref, files = code_reference(builder)
    tensors = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    spec = ModelSpec(
        builder=ref,
        task=task,
        input=spec_in,
        outputs=0,
        args=json_args,
        classes=json_classes,
        example=rows.tolist(),
        example_target=target,
        info=json_info,
    )
    metadata = {CONFIG_KEY: json.dumps(spec.to_config())}
    if files:
        metadata[CODE_KEY] = json.dumps(files)
    rebuilt, _ = load_float(Tensors(tensors, metadata))  # the stage fails here, not at registration
    out = forward(rebuilt, spec, rows)
    if not np.isfinite(out).all():
        raise ModelContractError("the rebuilt model gives non-finite outputs on the example rows")
    outputs = 1 if out.ndim == 1 else int(out.shape[1])
    if json_classes is not None and (task != "classifier" or len(json_classes) != outputs):
        raise ModelContractError(f"classes has {len(json_classes)} names but the classifier outputs {outputs} classes")
    spec = ModelSpec(**{**spec.__dict__, "outputs": outputs})
    metadata[CONFIG_KEY] = json.dumps(spec.to_config())
    return Tensors(tensors, metadata)
