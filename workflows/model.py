"""The workflow model: stages are typed functions whose parameter names are the edges.

A parameter named after another stage (or mapped with `inputs={param: stage}`) receives that
stage's output; every other parameter is a stage parameter with a default or a run-time value.
A parameter called `ctx` receives the `StageContext`.
"""

from __future__ import annotations

import functools
import inspect
import keyword
import re
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from actors.resources import Resources, ResourceSpecError
from actors.streaming import SHARD_PARAM, Stream, StreamError
from workflows.errors import WorkflowDefinitionError
from workflows.retry import DEFAULT_RETRIES, RetryPolicy

CONTEXT_PARAM = "ctx"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def _check_name(name: object, what: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or keyword.iskeyword(name):
        raise WorkflowDefinitionError(f"{what} {name!r} must be a Python identifier of at most 64 characters")
    return name


@dataclass(frozen=True, eq=False)
class Stage:
    """One step of a workflow: a function (or a class with `__call__`) and what it asks for."""

    name: str
    fn: Callable[..., Any]
    resources: Resources = field(default_factory=Resources)
    inputs: dict[str, str] = field(default_factory=dict)
    cache: bool = True
    version: str | None = None
    register_model: str | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    gate: bool = False  # an evaluation gate: its outcome is tagged on upstream registered models
    stream: Stream | None = None  # called once per shard on a pool; consumers read while it runs

    def __post_init__(self) -> None:
        _check_name(self.name, "stage name")
        if not callable(self.fn):
            raise WorkflowDefinitionError(f"stage {self.name!r}: {self.fn!r} is not callable")
        if self.stream is not None:
            self._check_stream(self.stream)
        if self.register_model is not None:
            _check_name(self.register_model.replace("-", "_"), f"stage {self.name!r}: register_model")
        unknown = set(self.inputs) - set(self.parameters)
        if unknown:
            raise WorkflowDefinitionError(
                f"stage {self.name!r}: inputs map {sorted(unknown)} but the function has no such parameter"
            )

    def _check_stream(self, spec: Stream) -> None:
        where = f"streaming stage {self.name!r}"
        names = self.signature.parameters
        if SHARD_PARAM not in names:
            raise WorkflowDefinitionError(f"{where} must take a {SHARD_PARAM!r} parameter: it is called once per shard")
        if CONTEXT_PARAM in names:
            raise WorkflowDefinitionError(f"{where} runs on a pool and gets no ctx; log metrics in its consumer")
        if isinstance(spec.shards, str) and spec.shards not in self.parameters:
            raise WorkflowDefinitionError(f"{where}: Stream(shards={spec.shards!r}) names no parameter of the stage")
        if self.register_model or self.gate:
            raise WorkflowDefinitionError(f"{where} cannot register a model or be a gate; use a consumer stage")

    @property
    def is_class(self) -> bool:
        return inspect.isclass(self.fn)

    @property
    def signature(self) -> inspect.Signature:
        target = self.fn.__call__ if self.is_class else self.fn
        sig = inspect.signature(target)
        if self.is_class:  # drop `self`
            sig = sig.replace(parameters=list(sig.parameters.values())[1:])
        return sig

    @property
    def parameters(self) -> dict[str, inspect.Parameter]:
        return {
            n: p
            for n, p in self.signature.parameters.items()
            if n != CONTEXT_PARAM
            and not (self.stream is not None and n == SHARD_PARAM)
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        }

    @property
    def wants_context(self) -> bool:
        return CONTEXT_PARAM in self.signature.parameters

    @functools.cached_property
    def _source(self) -> str:
        # Read once per stage object: the file may be edited while a run is going (line numbers move).
        try:
            return inspect.getsource(self.fn)
        except (OSError, TypeError):
            return f"{getattr(self.fn, '__module__', '')}.{getattr(self.fn, '__qualname__', self.name)}"

    def source(self) -> str:
        """The code that defines the stage, for cache keys (falls back to the qualified name)."""
        return self._source

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the user's function directly (handy in unit tests)."""
        return self.fn()(*args, **kwargs) if self.is_class else self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Stage({self.name!r}, {self.resources.describe()})"


def stage(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    cpus: float = 1,
    gpus: float = 0,
    memory: int | str | None = None,
    accelerator_type: str | None = None,
    resources: Mapping[str, float] | None = None,
    fallback: str | None = None,
    inputs: Mapping[str, str] | None = None,
    cache: bool = True,
    version: str | None = None,
    register_model: str | None = None,
    retries: int = DEFAULT_RETRIES,
    retry_on: tuple[type[BaseException], ...] | type[BaseException] = (),
    retry_backoff_s: float = 1.0,
    timeout_s: float | None = None,
    gate: bool = False,
    stream: Stream | None = None,
) -> Any:
    """Declare a stage: `@stage(gpus=1, fallback="cpu")` or bare `@stage`.

    `retries` applies to infrastructure failures always and to user exceptions listed in `retry_on`;
    `timeout_s` fails an attempt that runs longer (retried only with `retry_on=(TimeoutError,)`).
    `stream=Stream(shards=N)` makes a streaming stage: see `actors.streaming`.
    """

    def wrap(f: Callable[..., Any]) -> Stage:
        stage_name = name or getattr(f, "__name__", repr(f))
        try:
            request = Resources(
                cpus=cpus,
                gpus=gpus,
                memory_bytes=memory,  # type: ignore[arg-type]  # parsed in Resources
                accelerator_type=accelerator_type,
                custom=dict(resources or {}),
                fallback=fallback,
            )
            policy = RetryPolicy.build(retries, retry_on, retry_backoff_s, timeout_s)
        except (ResourceSpecError, StreamError, WorkflowDefinitionError) as exc:
            raise WorkflowDefinitionError(f"stage {stage_name!r}: {exc}") from exc
        return Stage(
            name=stage_name,
            fn=f,
            resources=request,
            inputs=dict(inputs or {}),
            cache=cache,
            version=version,
            register_model=register_model,
            retry=policy,
            gate=gate,
            stream=stream,
        )

    return wrap(fn) if fn is not None else wrap


@dataclass(frozen=True)
class Edge:
    upstream: str
    downstream: str
    param: str


class Workflow:
    """A validated DAG of stages. Construction raises `WorkflowDefinitionError` listing every problem."""

    def __init__(self, name: str, stages: Iterable[Stage], *, description: str = "", max_actors: int = 64) -> None:
        self.name = _check_name(name, "workflow name")
        self.description = description
        stages = list(stages)
        problems: list[str] = []
        # Actors of one resource shape at most: bounds a fan-out on the nodes alive and those the autoscaler
        # may launch for it (each actor asks for its own resources, which is what makes it launch nodes).
        self.max_actors = max_actors
        if isinstance(max_actors, bool) or not isinstance(max_actors, int) or max_actors < 1:
            problems.append(f"max_actors={max_actors!r} must be a whole number >= 1 (actors per resource shape)")
        self.stages: dict[str, Stage] = {}
        for s in stages:
            if not isinstance(s, Stage):
                problems.append(f"{s!r} is not a stage; decorate it with @stage")
            elif s.name in self.stages:
                problems.append(f"duplicate stage name {s.name!r}; pass name=... to @stage to tell them apart")
            else:
                self.stages[s.name] = s
        if not self.stages and not problems:
            problems.append(f"workflow {name!r} has no stages")
        self.edges: list[Edge] = []
        self.param_names: dict[str, dict[str, inspect.Parameter]] = {}
        for s in self.stages.values():
            params = {}
            for pname, p in s.parameters.items():
                if pname in s.inputs:
                    up = s.inputs[pname]
                    if up not in self.stages:
                        problems.append(
                            f"stage {s.name!r} maps input {pname!r} to unknown stage {up!r}; "
                            f"stages are {sorted(self.stages)}"
                        )
                    else:
                        self.edges.append(Edge(up, s.name, pname))
                elif pname in self.stages and pname != s.name:
                    self.edges.append(Edge(pname, s.name, pname))
                else:
                    params[pname] = p
            self.param_names[s.name] = params
        if not problems:
            problems += self._find_cycle()
        if problems:
            raise WorkflowDefinitionError(f"workflow {name!r} is invalid:\n  - " + "\n  - ".join(problems), problems)
        self._up: dict[str, list[Edge]] = {n: [] for n in self.stages}
        self._down: dict[str, list[str]] = {n: [] for n in self.stages}
        for e in self.edges:
            self._up[e.downstream].append(e)
            self._down[e.upstream].append(e.downstream)
        self.order = self._topological_order()

    def _topological_order(self) -> list[str]:
        indegree = {n: 0 for n in self.stages}
        for e in self.edges:
            indegree[e.downstream] += 1
        ready = deque(n for n in self.stages if indegree[n] == 0)
        order = []
        while ready:
            n = ready.popleft()
            order.append(n)
            for d in self._down[n]:
                indegree[d] -= 1
                if indegree[d] == 0:
                    ready.append(d)
        return order

    def _find_cycle(self) -> list[str]:
        graph: dict[str, list[str]] = {n: [] for n in self.stages}
        for e in self.edges:
            graph[e.upstream].append(e.downstream)
        state: dict[str, int] = {}  # 1 = on the stack, 2 = done

        def visit(n: str, path: list[str]) -> list[str] | None:
            state[n] = 1
            for m in graph[n]:
                if state.get(m) == 1:
                    return [*path[path.index(m) :], m] if m in path else [n, m]
                if m not in state and (found := visit(m, [*path, m])):
                    return found
            state[n] = 2
            return None

        for n in self.stages:
            if n not in state and (cycle := visit(n, [n])):
                return [f"cycle: {' -> '.join(cycle)}; remove one of these edges"]
        return []

    def upstream(self, stage_name: str) -> list[Edge]:
        return list(self._up[stage_name])

    def downstream(self, stage_name: str) -> list[str]:
        return sorted(set(self._down[stage_name]))

    def resolve_params(self, overrides: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
        """Per-stage parameter values from defaults and overrides.

        Override keys are `stage.param` or a bare `param` that applies to every stage having it.
        Unknown keys and parameters left without a value are errors.
        """
        overrides = dict(overrides or {})
        values: dict[str, dict[str, Any]] = {n: {} for n in self.stages}
        problems = []
        used = set()
        for sname, params in self.param_names.items():
            for pname, p in params.items():
                for key in (f"{sname}.{pname}", pname):
                    if key in overrides:
                        values[sname][pname] = overrides[key]
                        used.add(key)
                        break
                else:
                    if p.default is inspect.Parameter.empty:
                        problems.append(
                            f"stage {sname!r} needs {pname!r}: no stage of that name feeds it and it has no "
                            f"default; add a stage named {pname!r}, map it with inputs={{{pname!r}: 'stage'}}, "
                            f"or pass --param {sname}.{pname}=VALUE"
                        )
                    else:
                        values[sname][pname] = p.default
        for key in sorted(set(overrides) - used):
            problems.append(f"parameter {key!r} matches no stage parameter; known: {self._known_params()}")
        if problems:
            raise WorkflowDefinitionError(
                f"workflow {self.name!r} parameters are invalid:\n  - " + "\n  - ".join(problems), problems
            )
        return values

    def _known_params(self) -> str:
        return ", ".join(f"{s}.{p}" for s, ps in self.param_names.items() for p in ps) or "(none)"

    def __repr__(self) -> str:
        return f"Workflow({self.name!r}, stages={self.order})"
