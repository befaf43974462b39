"""Pruning + int8 compression of the digits MLP: no Ray. The model is trained by the real stage functions."""

import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear
from torch.nn.utils import prune

from actors.context import StageContext
from serving.compress import compress, load_any, load_compressed, measure
from serving.model import from_tensors, predict_proba
from storage import ArtifactStore, StoreConfig, Tensors
from storage.formats import SAFETENSORS, decode, encode
from workflows.builtin import digits

PRUNE = 0.3
QUANT_WARNINGS = pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions:UserWarning")


@pytest.fixture(scope="module")
def trained():
    """(float bundle, held-out raw rows, labels) from the built-in preprocess and train stages."""
    ctx = StageContext(run_id="t", stage="s", node_id="n", device="cpu")
    table = digits.preprocess.fn(ctx)
    bundle = digits.train.fn(ctx, table)
    x, y = digits._raw_test_rows(table)
    return bundle, x, y


@pytest.fixture(scope="module")
def compressed(trained):
    return compress(trained[0], prune_amount=PRUNE)


def _linear_names(bundle: Tensors) -> list[str]:
    return sorted(k.removesuffix(".weight_int8") for k in bundle.tensors if k.endswith(".weight_int8"))


def test_encodes_as_safetensors_without_pickle_and_rebuilds(compressed, trained):
    fmt, data, _ = encode(compressed)
    assert fmt == SAFETENSORS
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])  # a safetensors file: JSON header, then raw arrays
    dtypes = {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}
    assert set(dtypes.values()) <= {"I8", "F32", "I64"}
    assert json.loads(header["__metadata__"]["config"])["compression"]["method"] == "dynamic-int8"
    restored = decode(fmt, data)  # allow_pickle defaults to False
    model = load_compressed(restored)
    x, _ = trained[1], trained[2]
    np.testing.assert_array_equal(predict_proba(model, x), predict_proba(load_compressed(compressed), x))


def test_layout_and_dtypes(compressed):
    arrays = compressed.numpy()
    assert _linear_names(compressed) == ["1", "3"]
    for name in _linear_names(compressed):
        assert arrays[f"{name}.weight_int8"].dtype == np.int8
        assert arrays[f"{name}.weight_scale"].dtype == np.float32 and arrays[f"{name}.weight_scale"].shape == (1,)
        assert arrays[f"{name}.weight_zero_point"].dtype == np.int64 and arrays[f"{name}.weight_zero_point"].shape == (
            1,
        )
        assert arrays[f"{name}.bias"].dtype == np.float32
        assert f"{name}.weight" not in arrays  # no float copy of the weights rides along
    assert arrays["0.mean"].dtype == np.float32 and arrays["0.scale"].dtype == np.float32
    config = json.loads(compressed.metadata["config"])
    assert config["compression"]["method"] == "dynamic-int8"
    assert config["compression"]["prune_amount"] == PRUNE
    assert config["layers"] == [64, 128, 10]


def test_compressed_is_under_40_percent_of_float(trained, compressed):
    float_size = len(encode(trained[0])[1])
    small_size = len(encode(compressed)[1])
    assert small_size < 0.4 * float_size, (small_size, float_size)


@pytest.mark.parametrize("amount", [PRUNE, 0.5])
def test_pruned_fraction_matches_prune_amount(trained, amount):
    bundle = compress(trained[0], prune_amount=amount)
    arrays = bundle.numpy()
    weights = [arrays[f"{n}.weight_int8"] for n in _linear_names(bundle)]
    zero = sum(int((w == 0).sum()) for w in weights) / sum(w.size for w in weights)
    assert zero == pytest.approx(amount, abs=0.05)
    assert json.loads(bundle.metadata["config"])["compression"]["weight_sparsity"] == pytest.approx(zero, abs=1e-6)


def test_accuracy_drop_at_most_one_point(trained, compressed):
    bundle, x, y = trained
    before = float((predict_proba(from_tensors(bundle)[0], x).argmax(1) == y).mean())
    after = float((predict_proba(load_compressed(compressed), x).argmax(1) == y).mean())
    assert before >= 0.9
    assert before - after <= 0.01, (before, after)


@QUANT_WARNINGS
def test_matches_quantize_dynamic_of_the_pruned_float_model(trained, compressed):
    from torch.ao.quantization import quantize_dynamic

    bundle, x, _ = trained
    reference, _ = from_tensors(bundle)
    for module in reference.modules():  # pruned independently of serving.compress
        if isinstance(module, nn.Linear):
            prune.l1_unstructured(module, name="weight", amount=PRUNE)
            prune.remove(module, "weight")
    reference = quantize_dynamic(reference, {nn.Linear}, dtype=torch.qint8)
    ours = load_compressed(compressed)
    for name in _linear_names(compressed):
        ref_w, our_w = reference.get_submodule(name).weight(), ours.get_submodule(name).weight()
        assert isinstance(ours.get_submodule(name), DynamicQuantizedLinear)
        assert our_w.dtype == torch.qint8 and our_w.qscheme() == ref_w.qscheme()
        assert our_w.q_scale() == ref_w.q_scale() and our_w.q_zero_point() == ref_w.q_zero_point()
        assert torch.equal(our_w.int_repr(), ref_w.int_repr())
    with torch.inference_mode():
        rows = torch.from_numpy(x.astype(np.float32))
        torch.testing.assert_close(ours(rows), reference(rows), rtol=1e-5, atol=1e-5)


def test_store_round_trip_gives_identical_predictions(tmp_path, trained, compressed):
    store = ArtifactStore(StoreConfig.from_urls([str(tmp_path)]))
    ref = store.put(compressed, run_id="r1", stage="compress")
    restored = store.get(ref)
    assert isinstance(restored, Tensors) and restored.metadata == compressed.metadata
    for key, value in compressed.numpy().items():  # same names, dtypes, shapes and values
        assert restored.tensors[key].dtype == value.dtype
        np.testing.assert_array_equal(restored.tensors[key], value, strict=True)
    x = trained[1]
    expected = predict_proba(load_compressed(compressed), x)
    np.testing.assert_array_equal(predict_proba(load_any(restored)[0], x), expected)


def test_load_any_dispatches_on_config(trained, compressed):
    plain, plain_config = load_any(trained[0])
    small, small_config = load_any(compressed)
    assert isinstance(plain[1], nn.Linear) and "compression" not in plain_config
    assert isinstance(small[1], DynamicQuantizedLinear) and small_config["compression"]["method"] == "dynamic-int8"


def test_refuses_bad_input(trained, compressed):
    with pytest.raises(ValueError, match="already compressed"):
        compress(compressed)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
        compress(trained[0], prune_amount=1.0)
    arrays = compressed.numpy()
    missing = Tensors({k: v for k, v in arrays.items() if k != "3.weight_scale"}, compressed.metadata)
    with pytest.raises(ValueError, match=r"missing '3.weight_scale'"):
        load_compressed(missing)
    wrong = Tensors({**arrays, "1.weight_int8": arrays["1.weight_int8"].astype(np.float32)}, compressed.metadata)
    with pytest.raises(ValueError, match="is float32, expected int8"):
        load_compressed(wrong)
    config = json.loads(compressed.metadata["config"])
    config["compression"]["method"] = "gptq-4bit"
    with pytest.raises(ValueError, match="gptq-4bit"):
        load_compressed(Tensors(arrays, {"config": json.dumps(config)}))


def test_measure_reports_accuracy_size_and_latency(trained, compressed):
    bundle, x, y = trained
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        before, after = measure(bundle, x, y, runs=10), measure(compressed, x, y, runs=10)
        bare = measure(load_compressed(compressed), x, y, runs=5)
    finally:
        torch.set_num_threads(threads)
    assert before["size_bytes"] == len(encode(bundle)[1]) and after["size_bytes"] == len(encode(compressed)[1])
    assert before["threads"] == after["threads"] == 1
    assert after["accuracy"] == bare["accuracy"] and bare["size_bytes"] is None
    assert before["latency_ms"] > 0 and after["latency_ms"] > 0
    with pytest.raises(ValueError, match="len"):
        measure(bundle, x, y[:-1])
