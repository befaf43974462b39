"""`serve_model(...)`: the library stage a workflow ends with to put its model on Ray Serve.

    serve = serve_model("train", after=["evaluate"])   # the model stage by name; gates it must wait for

It rolls the upstream model out blue/green (optional canary) with `serving.rollout.Rollout`, whatever its
architecture: the replicas rebuild it from its contract (`serving.contract`) and take their request schema
from it. The app name and route default to the workflow's name. The result is the endpoint and an example
request built from the model's own example rows.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from actors.context import StageContext
from serving.config import ModelSource, ServeConfig
from storage import Tensors
from workflows.errors import WorkflowDefinitionError
from workflows.model import Stage, stage

_SERVE = ServeConfig()
# stage parameter -> default; `tierflow run ... -p serve.port=8001` overrides any of them
PARAMS: dict[str, Any] = {
    "app_name": None,  # None: the workflow's name, lower-cased, '_' -> '-'
    "host": _SERVE.host,
    "port": _SERVE.port,
    "replica_cpus": _SERVE.num_cpus,
    "replica_gpus": _SERVE.num_gpus,
    "replica_accelerator_type": _SERVE.accelerator_type,
    "replica_fallback": "cpu",
    "min_replicas": _SERVE.min_replicas,
    "max_replicas": _SERVE.max_replicas,
    "target_ongoing_requests": _SERVE.target_ongoing_requests,
    "upscale_delay_s": _SERVE.upscale_delay_s,
    "downscale_delay_s": _SERVE.downscale_delay_s,
    "max_batch_size": _SERVE.max_batch_size,
    "batch_wait_timeout_s": _SERVE.batch_wait_timeout_s,
    "max_ongoing_requests": _SERVE.max_ongoing_requests,
    "max_queued_requests": _SERVE.max_queued_requests,
    "canary_share": _SERVE.canary_share,
    # generators only (serving.generate_app): the decoding engine's batching and the deadline schedule
    "generation_batching": _SERVE.generation_batching,
    "target_ttft_s": _SERVE.target_ttft_s,
    "target_tbt_s": _SERVE.target_tbt_s,
}


def app_name_for(workflow: str) -> str:
    """A Serve app name (`[a-z][a-z0-9-]*`, <= 48) from a workflow name."""
    name = re.sub(r"[^a-z0-9-]", "-", workflow.lower()).strip("-")[:48] or "model"
    return name if name[0].isalpha() else f"m-{name}"[:48]


def serve_model(
    model: str,
    *,
    after: Sequence[str] = (),
    name: str = "serve",
    cpus: float = 0.25,
    **defaults: Any,
) -> Stage:
    """A stage that serves the output of stage `model` (a `torch_model(...)` bundle, plain or compressed).

    `after` names stages to wait for (e.g. the evaluation gate); their dict outputs are merged into the
    result. `defaults` change the serving parameters' defaults (see `PARAMS`), e.g. `port=8001`.
    """
    unknown = sorted(set(defaults) - set(PARAMS))
    if unknown:
        raise WorkflowDefinitionError(f"serve_model: unknown settings {unknown}; known: {sorted(PARAMS)}")
    clash = sorted({model, *after} & {*PARAMS, "ctx", "model"})
    if clash:
        raise WorkflowDefinitionError(f"serve_model: stages named {clash} clash with the serve stage's parameters")
    waits = tuple(a for a in after if a != model)

    def serve(ctx: StageContext, **kwargs: Any) -> dict[str, Any]:
        return deploy(ctx, kwargs, waits)

    P = inspect.Parameter
    params = [P("ctx", P.POSITIONAL_OR_KEYWORD), P("model", P.POSITIONAL_OR_KEYWORD)]
    params += [P(w, P.POSITIONAL_OR_KEYWORD) for w in waits]
    params += [P(k, P.POSITIONAL_OR_KEYWORD, default=defaults.get(k, v)) for k, v in PARAMS.items()]
    serve.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]  # the edges are these names
    return stage(serve, name=name, cpus=cpus, cache=False, inputs={"model": model})


def _workflow_name(ctx: StageContext) -> str:
    from storage import ArtifactStore  # noqa: PLC0415
    from workflows.journal import Journals  # noqa: PLC0415

    # the driver writes the run's journal (with its workflow name) before any stage starts
    return Journals(ArtifactStore(ctx.store_config)).read(ctx.run_id).workflow


def deploy(ctx: StageContext, kw: dict[str, Any], waits: Sequence[str]) -> dict[str, Any]:
    from serving.contract import spec_of  # noqa: PLC0415
    from serving.rollout import Rollout  # noqa: PLC0415

    bundle: Tensors = kw["model"]
    spec = spec_of(bundle)  # a clear error now rather than a replica that cannot start
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
        task=spec.task,
    )
    app_name = kw["app_name"] or app_name_for(_workflow_name(ctx))
    gpus = kw["replica_gpus"]
    config = ServeConfig(
        app_name=app_name,
        host=kw["host"],
        port=kw["port"],
        num_cpus=kw["replica_cpus"],
        num_gpus=gpus,
        accelerator_type=kw["replica_accelerator_type"],
        fallback=kw["replica_fallback"] if gpus else None,
        min_replicas=kw["min_replicas"],
        max_replicas=kw["max_replicas"],
        target_ongoing_requests=kw["target_ongoing_requests"],
        upscale_delay_s=kw["upscale_delay_s"],
        downscale_delay_s=kw["downscale_delay_s"],
        max_batch_size=kw["max_batch_size"],
        batch_wait_timeout_s=kw["batch_wait_timeout_s"],
        max_ongoing_requests=kw["max_ongoing_requests"],
        max_queued_requests=kw["max_queued_requests"],
        generation_batching=kw["generation_batching"],
        target_ttft_s=kw["target_ttft_s"],
        target_tbt_s=kw["target_tbt_s"],
    )
    rollout = Rollout(ctx.store_config, config)
    url = rollout.deploy(source, canary_share=kw["canary_share"])  # type: ignore[arg-type]
    ctx.set_tag("tierflow.endpoint", url)
    ctx.set_tag("tierflow.replica_resources", json.dumps(rollout.replica_options, sort_keys=True))
    direct = rollout.direct_urls()  # [] unless the cluster runs Serve with direct ingress
    out: dict[str, Any] = {}
    for w in waits:  # e.g. the evaluation's accuracy; the serve stage's own keys win
        if isinstance(kw[w], dict):
            out |= {k: v for k, v in kw[w].items() if isinstance(v, int | float | str | bool)}
    # where the example request goes: a generator answers text at /generate (non-streaming unless asked)
    route = "generate" if spec.generation else "predict"
    out |= {
        "url": url,
        "predict_url": f"{url}/{route}",
        "direct_predict_urls": [f"{u}/{route}" for u in direct],
        "app_name": app_name,
        "replica_resources": rollout.replica_options,
        "model_digest": facts["digest"],
        "task": spec.task,
        **_request_schema(spec),
        **lineage,
    }
    if spec.example_target:
        out["example_label"] = spec.example_target[0]
    return out


def _request_schema(spec: Any) -> dict[str, Any]:
    """What a request to the endpoint takes, and an example one built from the model's own example."""
    if spec.generation is not None:
        return {"generation": asdict(spec.generation), "example": {"prompt": spec.generation.example_prompt}}
    schema = spec.row_input()
    return {
        "input": {"width": schema.width, "dtype": schema.dtype, "min": schema.min, "max": schema.max},
        "example": {"instances": spec.example_rows()[:1].tolist()},
    }
