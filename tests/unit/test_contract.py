"""The model contract (serving.contract): bundling, rebuilding, shipping code, compression, registry checks.
No Ray; real torch and MLflow's own save/load (in a temporary folder)."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from serving.compress import compress, compress_if_supported, load_compressed, unsupported
from serving.contract import InputSpec, ModelContractError, forward, load_any, spec_of, torch_model
from serving.model import build_mlp, to_tensors
from serving.registry import RegistrationError, load_back, save_pyfunc
from storage import Tensors
from storage.formats import decode, encode
from tests.fixtures.byom_workflows import TabularNet, build_regressor
from workflows.loader import _load_file

REPO = Path(__file__).resolve().parents[2]
ROWS = np.abs(np.random.default_rng(0).normal(3, 1, (6, 30))).astype(np.float32)


@pytest.fixture(scope="module")
def bn_model() -> nn.Module:
    torch.manual_seed(0)
    model = TabularNet(30, 8)
    model.train()
    for _ in range(3):  # move BatchNorm's running statistics away from their initial values
        model(torch.from_numpy(ROWS) * 2)
    return model.eval()


def _bundle(model: nn.Module, **kw) -> Tensors:
    args = {"builder": TabularNet, "args": {"n_features": 30, "hidden": 8}, "task": "classifier", "input": 30}
    return torch_model(model, example=ROWS, **{**args, **kw})


def test_round_trip_keeps_buffers_and_outputs(bn_model):
    bundle = decode(*encode(_bundle(bn_model, classes=["no", "yes"]))[:2])  # through safetensors bytes
    assert "net.0.running_mean" in bundle.tensors and "net.0.num_batches_tracked" in bundle.tensors
    model, spec = load_any(bundle)
    torch.testing.assert_close(model.net[0].running_var, bn_model.net[0].running_var)
    assert int(model.net[0].num_batches_tracked) == 3
    with torch.inference_mode():
        expected = torch.softmax(bn_model(torch.from_numpy(ROWS)), 1).numpy()
    np.testing.assert_allclose(forward(model, spec, ROWS), expected, rtol=1e-6)
    assert spec.outputs == 2 and spec.labels(expected)[0] in ("no", "yes")
    assert spec.builder == "tests.fixtures.byom_workflows:TabularNet"
    assert spec.example == ROWS[:5].tolist()  # at most five example rows travel


def test_single_logit_classifier_and_regressor_outputs():
    binary = one_logit()
    proba = forward(binary, spec_of(_bundle_of(binary, "classifier")), ROWS)
    assert proba.shape == (6, 2) and np.allclose(proba.sum(1), 1)
    reg = build_regressor(30, 4)
    bundle = torch_model(
        reg, builder=build_regressor, args={"n_features": 30, "hidden": 4}, task="regressor", input=30, example=ROWS
    )
    model, spec = load_any(bundle)
    assert forward(model, spec, ROWS).shape == (6,) and spec.outputs == 1


def one_logit() -> nn.Module:
    return nn.Sequential(nn.Linear(30, 1))


def conv_net() -> nn.Module:
    return nn.Sequential(nn.Unflatten(1, (1, 30)), nn.Conv1d(1, 2, 30), nn.Flatten())


def _bundle_of(module: nn.Module, task: str, builder=None) -> Tensors:
    return torch_model(module, builder=builder or one_logit, task=task, input=30, example=ROWS)


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"builder": "tierflow_no_such_module:Net"}, "is not importable"),
        ({"builder": "tests.fixtures.byom_workflows:Nope"}, "has no 'Nope'"),
        ({"builder": "no-colon"}, "package.module:function_or_class"),
        ({"task": "ranking"}, "use 'classifier'"),
        ({"input": 29}, "exactly 29 features"),
        ({"input": InputSpec(30, max=1.0)}, "above the model.s input range"),
        ({"classes": ["a", "b", "c"]}, "3 names but the classifier outputs 2"),
        ({"args": {"n_features": 30, "hidden": 9}}, "do not fit"),
        ({"args": {"n_features": 30, "hidden": 8, "dropout": float("nan")}}, "JSON-serialisable"),
    ],
)
def test_contract_errors_say_what_to_fix(bn_model, kw, needle):
    with pytest.raises(ModelContractError, match=needle):
        _bundle(bn_model, **kw)


def test_a_builder_defined_inside_a_function_is_refused(bn_model):
    class Local(TabularNet):
        pass

    with pytest.raises(ModelContractError, match="inside a function"):
        _bundle(bn_model, builder=Local)


def test_input_spec_checks():
    spec = InputSpec(2, "int64", min=0, max=10)
    assert spec.check(np.array([[1, 2]], np.float64)) is None
    assert "integer" in spec.check(np.array([[1.5, 2]]))
    below = spec.check(np.array([[-1, 2]]))
    assert "below the model's input range" in below and "[0, 10]" in below
    assert "exactly 2" in spec.check(np.array([[1, 2, 3]]))
    with pytest.raises(ModelContractError, match="min < max"):
        InputSpec(2, min=3, max=1)
    with pytest.raises(ModelContractError, match="int >= 1"):
        InputSpec(0)


def test_a_workflow_file_ships_its_source_and_loads_without_it(tmp_path):
    """A builder defined in a workflow loaded by path travels as source text; a fresh interpreter that
    cannot import the file rebuilds the model from the bundle alone."""
    src = tmp_path / "my_flow.py"
    src.write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            class Wide(nn.Module):
                def __init__(self, width: int):
                    super().__init__()
                    self.norm = nn.BatchNorm1d(width)
                    self.out = nn.Linear(width, 3)

                def forward(self, x):
                    return self.out(self.norm(x))
            """
        )
    )
    module = _load_file(str(src))  # as `tierflow run my_flow.py:...` loads it
    net = module.Wide(7).eval()
    rows = np.ones((2, 7), np.float32)
    bundle = torch_model(net, builder=module.Wide, args={"width": 7}, task="classifier", input=7, example=rows)
    assert spec_of(bundle).builder == "my_flow:Wide"
    assert [f["path"] for f in json.loads(bundle.metadata["code"])] == ["my_flow.py"]
    blob = tmp_path / "model.safetensors"
    blob.write_bytes(bytes(encode(bundle)[1]))
    script = (
        "import sys; from storage.formats import decode; from serving.contract import load_any, forward; "
        "import numpy as np; b = decode('safetensors', open(sys.argv[1], 'rb').read()); m, s = load_any(b); "
        "print(forward(m, s, np.ones((2, 7), np.float32)).shape, sys.modules['my_flow'].__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(blob)], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    shape, where = out.stdout.split(") ")
    assert shape == "(2, 3" and "tierflow-code" in where


def test_int8_compression_of_a_batchnorm_model(bn_model):
    bundle = _bundle(bn_model)
    small = compress(bundle, prune_amount=0.0)
    model = load_compressed(small)
    assert model.net[0].running_mean.dtype == torch.float32 and int(model.net[0].num_batches_tracked) == 3
    assert np.asarray(small.tensors["net.0.num_batches_tracked"]).dtype == np.int64  # buffers keep their dtype
    spec = spec_of(small)
    assert spec.compression["method"] == "dynamic-int8"
    float_model, _ = load_any(bundle)
    np.testing.assert_allclose(forward(model, spec, ROWS), forward(float_model, spec, ROWS), atol=0.05)


def test_a_model_without_linear_layers_is_passed_through_with_a_reason():
    bundle = _bundle_of(conv_net(), "classifier", conv_net)
    assert "no nn.Linear layers" in unsupported(bundle)
    with pytest.raises(ModelContractError, match=r"no nn\.Linear layers"):
        compress(bundle)
    kept, reason = compress_if_supported(bundle)
    assert kept is bundle and "Conv" not in reason and "no nn.Linear" in reason


def test_bundles_from_before_the_contract_still_load():
    legacy = to_tensors(build_mlp([4, 3]), {"layers": [4, 3]})
    model, spec = load_any(legacy)
    assert spec.builder == "serving.model:build_mlp" and spec.input.width == 4
    assert forward(model, spec, np.zeros((1, 4), np.float32)).shape == (1, 3)


def test_registry_saves_a_pyfunc_that_loads_back(tmp_path, bn_model):
    data = bytes(encode(_bundle(bn_model, classes=["no", "yes"]))[1])
    model_dir, _, example, output = save_pyfunc(data, tmp_path)
    assert (model_dir / "artifacts" / "model.safetensors").read_bytes() == data
    assert (model_dir / "code" / "tests" / "fixtures" / "byom_workflows.py").is_file()
    path_before = list(sys.path)
    load_back(model_dir, example, output)
    assert sys.path == path_before  # the load-back leaves the registering process as it was
    assert set(output.tolist()) <= {"no", "yes"}


def test_registry_refuses_a_model_whose_builder_cannot_be_imported(tmp_path, bn_model):
    bundle = _bundle(bn_model)
    config = json.loads(bundle.metadata["config"])
    config["builder"] = "tierflow_gone:TabularNet"
    broken = Tensors(bundle.tensors, {"config": json.dumps(config)})
    with pytest.raises(RegistrationError, match=r"'tierflow_gone:TabularNet' is not importable"):
        save_pyfunc(bytes(encode(broken)[1]), tmp_path)
    assert not (tmp_path / "model").exists()


def test_a_workflow_file_named_like_an_installed_module_is_refused(tmp_path):
    """Shipped code is imported only where its name is not importable already: a `json.py` of one's own
    would load as the standard library's json, so it is refused with the fix (rename the file)."""
    src = tmp_path / "json.py"
    src.write_text("from torch import nn\n\n\nclass Net(nn.Linear):\n    def forward(self, x):\n        return x\n")
    module = _load_file(str(src))
    with pytest.raises(ModelContractError, match=r"json.py: an installed module of the same name .*rename the file"):
        torch_model(module.Net(2, 2), builder=module.Net, args={"in_features": 2, "out_features": 2},
                    task="classifier", input=2, example=np.ones((1, 2), np.float32))  # fmt: skip
