"""The generator contract (issue 20): tokenizer, detokenizer, batched states, seeded sampling, stop strings,
and bundle -> load_generator for the built-in GRU and users' own models. Real torch; no Ray."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.contract import ModelContractError, torch_model
from serving.generation import (
    EOS_ID,
    Detokenizer,
    Generator,
    StopMatcher,
    decode,
    encode,
    generator_model,
    load_generator,
)
from serving.validation import InvalidInput
from storage import Tensors
from storage.formats import SAFETENSORS
from storage.formats import decode as decode_bytes
from storage.formats import encode as encode_value
from tests.fixtures import generative_models as user
from workflows.builtin.textgen import ByteGRU

CORPUS = "Return the value of the key. Return the list of items. " * 20
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)


def _bundle(module: torch.nn.Module, builder, args=None, **kw) -> Tensors:
    return generator_model(module, builder=builder, args=args or {}, max_context=128, example_prompt="Return ", **kw)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Small models: torch's second thread only adds contention on a shared 2-core machine (10x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models() -> dict[str, Generator]:
    torch.manual_seed(0)
    return {
        "gru": load_generator(_bundle(ByteGRU(16, 32, 2), ByteGRU, {"embed": 16, "hidden": 32, "layers": 2})),
        "conv": load_generator(_bundle(user.CausalConvLM(), user.CausalConvLM)),
        "lstm": load_generator(_bundle(user.TinyLSTM(), user.TinyLSTM)),
    }


# -- text ------------------------------------------------------------------------------------------
@SETTINGS
@given(st.text(max_size=40))
def test_encode_decode_round_trip_any_unicode(text: str) -> None:
    ids = encode(text)
    assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode())
    assert decode(ids) == text


@SETTINGS
@given(st.lists(st.text(min_size=1, max_size=4), max_size=8))
def test_detokenizer_emits_only_whole_characters(chars: list[str]) -> None:
    """Byte by byte, the text emitted once a character's last byte is pushed is exactly the text so far."""
    detok, out = Detokenizer(), ""
    for k, piece in enumerate(chars):
        for b in piece.encode():
            out += detok.push(b)
            assert out.encode() in {"".join(chars[:k]).encode() + piece.encode()[:n] for n in range(5 * 4)}
        assert out == "".join(chars[: k + 1])
    assert detok.flush() == ""


def test_detokenizer_holds_split_characters_and_drops_special_ids() -> None:
    detok = Detokenizer()
    euro = "€".encode()  # 3 bytes
    assert [detok.push(b) for b in euro] == ["", "", "€"]
    assert detok.push(EOS_ID) == "" and detok.push(999) == ""
    assert detok.push(0xE2) == "" and detok.flush() == "\ufffd"  # a cut-off character at the end
    assert decode([0xFF, ord("a")]) == "\ufffda"  # an invalid byte from a sampled model is replaced


# -- batched states -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gru", "conv", "lstm"])
def test_stack_unstack_round_trip(models: dict[str, Generator], name: str) -> None:
    gen = models[name]
    states = [gen.prefill(encode(p))[1] for p in ("a", "bc", "déf")]
    back = gen.unstack(gen.stack(states))
    flat = lambda s: list(s) if isinstance(s, tuple) else [s]  # noqa: E731
    assert len(back) == 3
    for got, want in zip(back, states, strict=True):
        assert all(torch.equal(g, w) for g, w in zip(flat(got), flat(want), strict=True))


@pytest.mark.parametrize("name", ["gru", "conv", "lstm"])
def test_batched_step_equals_per_sequence_steps(models: dict[str, Generator], name: str) -> None:
    gen = models[name]
    prompts = ["Return the ", "x", "naïve café"]  # different lengths, multi-byte characters
    firsts = [gen.prefill(encode(p)) for p in prompts]
    tokens = [int(logits.argmax()) for logits, _ in firsts]
    batch = gen.stack([s for _, s in firsts])
    singles = [s for _, s in firsts]
    for _ in range(5):
        logits_b, batch = gen.step(tokens, batch)
        alone = []
        for i, t in enumerate(tokens):
            logits_i, singles[i] = gen.step([t], singles[i])
            alone.append(logits_i[0])
        torch.testing.assert_close(logits_b, torch.stack(alone), atol=1e-5, rtol=1e-5)
        tokens = [int(x) for x in logits_b.argmax(1)]


# -- sampling ------------------------------------------------------------------------------------------
def _decode_batch(gen: Generator, requests: list[tuple[str, float, int | None]], steps: int) -> list[list[int]]:
    """An engine's loop in miniature: prefill each request, then sample and step them as one batch."""
    firsts = [gen.prefill(encode(p)) for p, _, _ in requests]
    logits = torch.stack([lg for lg, _ in firsts])
    states = gen.stack([s for _, s in firsts])
    rngs = [torch.Generator().manual_seed(s) if s is not None else None for _, _, s in requests]
    temps = [t for _, t, _ in requests]
    out: list[list[int]] = [[] for _ in requests]
    for _ in range(steps):
        tokens = gen.sample(logits, temps, rngs)
        for row, t in zip(out, tokens, strict=True):
            row.append(t)
        logits, states = gen.step(tokens, states)
    return out


def test_seeded_request_is_reproducible_whatever_shares_its_batch(models: dict[str, Generator]) -> None:
    gen = models["gru"]
    me = ("Return the ", 1.0, 1234)
    alone = _decode_batch(gen, [me], 24)[0]
    crowd = [("import os", 0.7, 5), me, ("€", 0.0, None), ("def f(x):", 1.5, None)]
    assert _decode_batch(gen, crowd, 24)[1] == alone
    assert _decode_batch(gen, [("zz", 2.0, 99), me], 24)[1] == alone
    other_seed = _decode_batch(gen, [("Return the ", 1.0, 4321)], 24)[0]
    assert other_seed != alone  # the seed matters: an untrained model's 257-way draws do not repeat by chance


def test_sample_greedy_and_temperature_follows_softmax(models: dict[str, Generator]) -> None:
    gen = models["gru"]
    logits = torch.full((gen.vocab_size,), -30.0)
    logits[[3, 7, 11]] = torch.tensor([0.0, 1.0, 2.0])
    assert gen.sample(logits[None], [0.0], [None]) == [11]
    rng = torch.Generator().manual_seed(0)
    draws = gen.sample(logits.repeat(3000, 1), [1.0] * 3000, [rng] * 3000)
    freq = torch.bincount(torch.tensor(draws), minlength=gen.vocab_size).double() / 3000
    expected = torch.softmax(logits.double(), 0)
    assert set(draws) <= {3, 7, 11}
    assert torch.allclose(freq[[3, 7, 11]], expected[[3, 7, 11]], atol=0.03)
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(InvalidInput, match="temperature"):
            gen.sample(logits[None], [bad], [None])


# -- stop strings --------------------------------------------------------------------------------------
ALPHABET = "ab\n"


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    st.text(ALPHABET, max_size=30),
    st.lists(st.text(ALPHABET, min_size=1, max_size=4), min_size=1, max_size=3),
    st.lists(st.integers(1, 6), min_size=1, max_size=30),
)
def test_stop_matcher_properties(text: str, stops: list[str], cuts: list[int]) -> None:
    # the reference: the first stop to complete when the text is read a character at a time
    ends = [(e, e - len(s)) for e in range(len(text) + 1) for s in stops if text[:e].endswith(s)]
    finds = [start for _, start in sorted(ends)[:1]]
    cut = finds[0] if finds else len(text)
    matcher, emitted, stopped, pos = StopMatcher(stops), "", False, 0
    for n in cuts * 10:
        if pos >= len(text):
            break
        piece, stopped = matcher.push(text[pos : pos + n])
        pos += n
        emitted += piece
        assert text[:cut].startswith(emitted)  # a stream prefix of the text before the stop
        assert emitted == text[:cut] if stopped else emitted + matcher.held == text[:pos]  # nothing lost
        assert not any(s in emitted for s in stops)
        if stopped:
            break
    emitted += matcher.flush()
    assert stopped == bool(finds)
    assert emitted == text[:cut]
    if finds:
        assert matcher.matched in stops and text[cut:].startswith(matcher.matched)


def test_stop_matcher_refuses_empty_stop() -> None:
    with pytest.raises(InvalidInput, match="non-empty"):
        StopMatcher(["\n", ""])


# -- the contract ------------------------------------------------------------------------------------
def test_bundle_round_trip_through_safetensors(models: dict[str, Generator]) -> None:
    torch.manual_seed(1)
    module = user.fit(user.CausalConvLM(), CORPUS, steps=80)
    bundle = _bundle(module, user.CausalConvLM, info={"corpus": "test"})
    _, data, _ = encode_value(bundle)
    gen = load_generator(decode_bytes(SAFETENSORS, bytes(data)))
    spec = gen.spec
    assert spec.task == "generator" and spec.input is None and spec.info["corpus"] == "test"
    assert spec.generation.tokenizer == "bytes" and spec.generation.example_prompt == "Return "
    assert (gen.vocab_size, gen.eos_id, gen.max_context, gen.state_batch_dim) == (257, 256, 128, 0)
    ids = encode("Return the ")
    torch.testing.assert_close(gen.prefill(ids)[0], module.step(torch.tensor([ids]), module.init_state(1))[0][0, -1])
    text = gen.generate("Return the ", max_tokens=30)
    assert text == gen.generate("Return the ", max_tokens=30)  # greedy: deterministic
    assert set(text) <= set(CORPUS)  # it learned the corpus's bytes in 80 steps
    cut = gen.generate("Return the ", max_tokens=30, stops=[text[5:7]])
    assert text.startswith(cut) and text[5:7] not in cut


def test_user_model_code_travels_in_the_bundle() -> None:
    bundle = _bundle(user.TinyLSTM(), user.TinyLSTM)
    files = [f["path"] for f in __import__("json").loads(bundle.metadata["code"])]
    assert any(p.endswith("generative_models.py") for p in files)
    builtin = _bundle(ByteGRU(8, 8), ByteGRU, {"embed": 8, "hidden": 8})
    assert "code" not in builtin.metadata  # tierflow's own module is installed where it loads


def test_refuses_a_module_without_the_protocol() -> None:
    with pytest.raises(ModelContractError, match=r"without init_state and step\(\).*docs/models.md"):
        _bundle(user.NotAGenerator(), user.NotAGenerator)


def test_refuses_a_wrong_state_batch_dim() -> None:
    with pytest.raises(ModelContractError, match="state_batch_dim=0"):
        _bundle(user.WrongBatchDim(), user.WrongBatchDim)


def test_a_step_that_fails_is_a_contract_error_naming_the_builder() -> None:
    with pytest.raises(ModelContractError, match=r"BrokenStep failed on its example prompt.*RuntimeError"):
        _bundle(user.BrokenStep(), user.BrokenStep)


def test_torch_model_points_generators_to_generator_model() -> None:
    with pytest.raises(ModelContractError, match="generator_model"):
        torch_model(ByteGRU(8, 8), builder=ByteGRU, task="generator", input=1, example=[[0.0]])


def test_compression_says_it_does_not_apply_to_a_generator() -> None:
    from serving.compress import compress_if_supported

    bundle = _bundle(ByteGRU(8, 8), ByteGRU, {"embed": 8, "hidden": 8})
    same, why = compress_if_supported(bundle)
    assert same is bundle and "is a generator" in why


def test_load_generator_refuses_a_classifier() -> None:
    from serving.model import build_mlp

    clf = torch_model(
        build_mlp([4, 3]), builder="serving.model:build_mlp", args={"layers": [4, 3]}, task="classifier",
        input=4, example=[[0.0, 1.0, 2.0, 3.0]],
    )  # fmt: skip
    with pytest.raises(ModelContractError, match="is a classifier, not a generator"):
        load_generator(clf)


def test_bad_prompts_are_client_errors(models: dict[str, Generator]) -> None:
    gen = models["gru"]
    with pytest.raises(InvalidInput) as empty:
        gen.prefill([])
    with pytest.raises(InvalidInput) as long:
        gen.prefill(encode("x" * 129))
    assert (empty.value.status, long.value.status) == (422, 413)
    assert "at most 128" in long.value.message
