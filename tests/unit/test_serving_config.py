"""Serving settings and replica placement are plain data and pure decisions: no Ray needed."""

import pytest

from actors.placement import NodeInfo
from serving.config import ModelSource, RolloutRefused, ServeConfig, ServingError
from serving.rollout import replica_options

CPU = NodeInfo("cpu", {"CPU": 4.0})
GPU = NodeInfo("gpu", {"CPU": 4.0, "GPU": 1.0, "accelerator_type:T4": 1.0})


def test_fixed_replicas_or_autoscaling():
    assert ServeConfig().deployment_options({"num_cpus": 1})["num_replicas"] == 1
    opts = ServeConfig(min_replicas=1, max_replicas=4, target_ongoing_requests=3).deployment_options({})
    assert opts["autoscaling_config"] == {  # Serve's own delays and window unless the workflow sets them
        "min_replicas": 1,
        "max_replicas": 4,
        "target_ongoing_requests": 3,
        "upscale_delay_s": 30.0,
        "downscale_delay_s": 600.0,
        "look_back_period_s": 30.0,
    }
    assert "num_replicas" not in opts
    assert (opts["max_ongoing_requests"], opts["max_queued_requests"]) == (64, 4 * 64)  # sized from the capacity


def test_autoscaling_can_react_in_seconds_and_serve_accepts_the_config():
    from ray.serve.config import AutoscalingConfig

    fast = ServeConfig(
        max_replicas=2, upscale_delay_s=0, downscale_delay_s=1, look_back_period_s=1, metrics_interval_s=0.2
    )
    auto = fast.deployment_options({})["autoscaling_config"]
    assert (auto["upscale_delay_s"], auto["downscale_delay_s"], auto["metrics_interval_s"]) == (0, 1, 0.2)
    parsed = AutoscalingConfig(**auto)  # what Serve itself validates the dict with
    assert (parsed.max_replicas, parsed.look_back_period_s) == (2, 1)


def test_replicas_run_user_code_on_the_main_loop_unless_asked_not_to():
    opts = ServeConfig().deployment_options({"num_cpus": 1, "runtime_env": {"env_vars": {"A": "1"}}})
    env = opts["ray_actor_options"]["runtime_env"]["env_vars"]
    assert env == {"A": "1", "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}
    assert opts["ray_actor_options"]["num_cpus"] == 1
    serve_default = ServeConfig(separate_user_code_thread=True).deployment_options({"num_cpus": 1})
    assert serve_default["ray_actor_options"] == {"num_cpus": 1}


def test_the_router_queue_is_never_shorter_than_the_capacity_unless_set(caplog):
    # Serve counts a request as queued until its router has handed it to a replica, full or not: a limit
    # below the capacity refuses clients that arrive together while slots are free (issue 16: 503s at 16)
    assert ServeConfig().deployment_options({})["max_queued_requests"] == 64
    three = ServeConfig(max_ongoing_requests=8, max_batch_size=8, max_replicas=3)
    assert three.deployment_options({})["max_queued_requests"] == 24
    assert ServeConfig(max_queued_requests=-1).queue_limit == -1 and "capacity" not in caplog.text
    assert ServeConfig(max_queued_requests=8).deployment_options({})["max_queued_requests"] == 8
    assert "below the replicas' capacity (64)" in caplog.text and "leave max_queued_requests unset" in caplog.text


def test_the_router_queue_is_short_and_polls_a_full_replica_often():
    # Serve's defaults (backoff to 0.5 s, a deep queue) starved a replica under overload: see ServeConfig
    opts = ServeConfig().deployment_options({})
    assert opts["request_router_config"] == {"initial_backoff_s": 0.005, "backoff_multiplier": 2, "max_backoff_s": 0.02}


def test_batches_do_not_wait_by_default_but_can():
    # adaptive batching: a batch is whatever queued while the previous one ran, so a lone request at low
    # load never waits for company; a positive wait stays available for models that need full batches
    assert ServeConfig().batch_wait_timeout_s == 0.0
    assert ServeConfig(batch_wait_timeout_s=0.01).batch_wait_timeout_s == 0.01
    with pytest.raises(ServingError, match="batch_wait_timeout_s"):
        ServeConfig(batch_wait_timeout_s=-0.001)


def test_a_batch_that_can_never_fill_is_warned_about(caplog):
    ServeConfig(max_batch_size=64, max_ongoing_requests=8)
    assert "can never fill" in caplog.text


def test_replicas_are_placed_like_stages():
    gpu = ServeConfig(num_cpus=0.5, num_gpus=0.5, accelerator_type="T4", fallback="cpu")
    assert replica_options(gpu, [CPU, GPU]) == {"num_cpus": 0.5, "num_gpus": 0.5, "accelerator_type": "T4"}
    assert replica_options(gpu, [CPU]) == {"num_cpus": 0.5}  # CPU fallback
    with pytest.raises(RolloutRefused, match=r"asks for .*GPU=0\.5.* no node can satisfy it"):
        replica_options(ServeConfig(num_gpus=0.5), [CPU])


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"app_name": "Digits!"}, "app_name"),
        ({"port": 0}, "port"),
        ({"min_replicas": 3, "max_replicas": 2}, "min_replicas"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_queued_requests": -2}, "max_queued_requests"),
        ({"max_queued_requests": 0}, r"max_queued_requests=0 \(must be >= 1, -1 for no limit"),  # Serve refuses 0
        ({"router_max_backoff_s": 0.001}, "router_initial_backoff_s"),
        ({"router_max_backoff_s": 0}, "router_max_backoff_s"),
        ({"canary_share": 1.0}, "canary_share"),
        ({"max_body_bytes": 10}, "max_body_bytes"),
        ({"num_gpus": 1.5}, "fractions are allowed below 1 only"),
        ({"accelerator_type": "A100"}, "needs gpus > 0"),
        ({"upscale_delay_s": -1}, r"upscale_delay_s=-1 \(must be >= 0\)"),
        ({"look_back_period_s": 5, "metrics_interval_s": 10}, r"look_back_period_s=5 \(must be > metrics_interval_s\)"),
        ({"min_replicas": 0}, r"must be 1 <= min_replicas <= max_replicas"),
    ],
)
def test_bad_settings_name_the_problem(kwargs, needle):
    with pytest.raises(ServingError, match=needle):
        ServeConfig(**kwargs)


def test_replicas_use_a_gpu_only_when_ray_assigned_one_and_torch_has_cuda():
    import torch

    from serving.app import serving_device

    assert serving_device([], compressed=False) == ("cpu", "no GPU assigned to this replica")
    device, why = serving_device(["0"], compressed=True)
    assert device == "cpu" and "CPU only" in why  # torch.ao dynamic int8 kernels are CPU kernels
    device, why = serving_device(["0"], compressed=False)
    if torch.cuda.is_available():  # not on this project's build machines (CPU-only torch, declared GPUs)
        assert device.startswith("cuda")
    else:
        assert device == "cpu" and "torch sees no CUDA device" in why


def test_a_model_source_needs_an_artifact_or_a_registry_version():
    with pytest.raises(ServingError, match="needs a store artifact or an MLflow model"):
        ModelSource(digest="0" * 64)
    assert ModelSource(digest="0" * 64, version="3", model_name="m", tracking_uri="sqlite:///x").label == "m v3"
