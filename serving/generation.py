"""Generative models (task `generator`): the module protocol, the bundle, and the pieces a decoding loop needs.

A user's language model is an `nn.Module` with two methods (and an optional attribute):

    init_state(batch: int) -> Tensor                      # the state before any token
    step(tokens: LongTensor[B, T], state) -> (logits[B, T, V], state)
    state_batch_dim: int = 1                              # the state's batch dimension (a GRU's h: [layers, B, H])

`step` runs the whole prompt at once (T = prompt length, "prefill") and then one token per decoding step
(T = 1). The state may also be a tuple of tensors (an LSTM's (h, c)), each batched along `state_batch_dim`.
A training stage returns it with `generator_model(...)`; `load_generator(...)` rebuilds it as a `Generator`,
whose `prefill`/`step`/`stack`/`unstack`/`sample` let an engine batch many sequences between steps.
Text goes in and out through the `bytes` tokenizer: ids 0-255 are UTF-8 bytes, `EOS_ID` ends a sequence.

Pure torch: no Ray, no Serve. Max tokens, stop handling and batching policy belong to the serving engine;
`Generator.generate` is the one-sequence reference loop (registry smoke test, docs, evaluation samples).
"""

from __future__ import annotations

import codecs
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from serving.config import ModelSource
from serving.contract import (
    CODE_KEY,
    CONFIG_KEY,
    GenerationSpec,
    ModelContractError,
    ModelSpec,
    code_reference,
    load_any,
)
from serving.validation import InvalidInput
from storage import Tensors

TOKENIZERS = ("bytes",)
BYTE_IDS = 256  # ids 0-255: one UTF-8 byte each
EOS_ID = 256
BYTES_VOCAB = 257
MAX_EXAMPLE_PROMPT = 200  # characters: the example is a smoke request, not a document
SMOKE_TOKENS = 4  # decoding steps checked when a bundle is made
PYFUNC_PARAMS = {"max_tokens": 32, "temperature": 0.0, "seed": 0}  # a registered generator's predict() defaults

State = Any  # a Tensor, or a tuple of Tensors, batched along `state_batch_dim`


# -- text <-> ids ------------------------------------------------------------------------------------
def encode(text: str) -> list[int]:
    """The `bytes` tokenizer: the UTF-8 bytes of `text`, one id each (no special ids added). Text holding an
    unpaired surrogate (a JSON `\\ud800` escape) is not UTF-8: `UnicodeEncodeError`."""
    return list(text.encode("utf-8"))


class Detokenizer:
    """Byte ids back to text as they stream: `push` returns only complete UTF-8 characters.

    A character's bytes may arrive over several steps; they are held until it is complete. Special ids
    (EOS and any id >= 256) produce no text. Invalid byte sequences decode to U+FFFD, as `bytes.decode`
    with `errors="replace"` would (a sampled model may emit any byte).
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if not 0 <= token_id < BYTE_IDS:
            return ""
        return self._decoder.decode(bytes((token_id,)))

    def flush(self) -> str:
        """What is still held at the end of the stream (an incomplete character becomes U+FFFD)."""
        return self._decoder.decode(b"", final=True)


def decode(ids: Sequence[int]) -> str:
    d = Detokenizer()
    return "".join(d.push(i) for i in ids) + d.flush()


# -- stop strings ------------------------------------------------------------------------------------
class StopMatcher:
    """Cuts streamed text at the first stop string to complete, never emitting any part of it.

    `push(text)` returns (text safe to emit now, whether a stop matched). Text that may be the start of a
    stop string is held back until the next push tells; `flush()` gives it up at the end of the stream.
    After a match, `matched` is the stop string and everything after it is dropped.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        stops = list(stops)
        if not all(isinstance(s, str) and s for s in stops):
            raise InvalidInput(422, "stop strings must be non-empty strings")
        self.stops = stops
        self.held = ""
        self.matched: str | None = None

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    def push(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        buffer = self.held + text
        hits = [(i + len(s), i, s) for s in self.stops if (i := buffer.find(s)) >= 0]
        if hits:  # the stop that completes first, as if the text came a character at a time
            _, at, self.matched = min(hits)
            self.held = ""
            return buffer[:at], True
        keep = self._partial(buffer)
        self.held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return "" if self.stopped else out

    def _partial(self, buffer: str) -> int:
        """Length of the longest suffix of `buffer` that is a proper prefix of some stop string."""
        for n in range(min(len(buffer), max((len(s) for s in self.stops), default=1) - 1), 0, -1):
            tail = buffer[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0


# -- the loaded model --------------------------------------------------------------------------------
def _check_protocol(module: Any, builder: str) -> int:
    missing = [m for m in ("init_state", "step") if not callable(getattr(module, m, None))]
    if missing:
        raise ModelContractError(
            f"{builder} builds a {type(module).__name__} without {' and '.join(missing)}(): a generator implements "
            "init_state(batch) -> state and step(tokens[B, T], state) -> (logits[B, T, V], state) (docs/models.md)"
        )
    dim = getattr(module, "state_batch_dim", 1)
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise ModelContractError(f"{builder}: state_batch_dim={dim!r} must be an int (the state's batch dimension)")
    return dim


class Generator:
    """A loaded generator: tokenizer, prefill/step on batched states, sampling. All under inference mode."""

    def __init__(self, module: Any, spec: ModelSpec, device: str = "cpu") -> None:
        if spec.task != "generator" or spec.generation is None:
            raise ModelContractError(
                f"{spec.builder} is a {spec.task}, not a generator: serve it as rows (serving.contract.forward)"
            )
        gen = spec.generation
        if gen.tokenizer not in TOKENIZERS:
            raise ModelContractError(f"tokenizer {gen.tokenizer!r} is not known here; known: {TOKENIZERS}")
        self.state_batch_dim = _check_protocol(module, spec.builder)
        if self.state_batch_dim != gen.state_batch_dim:
            raise ModelContractError(
                f"{spec.builder}: state_batch_dim is {self.state_batch_dim} but the model was bundled with "
                f"{gen.state_batch_dim}; rebuild the bundle with generator_model(...)"
            )
        self.module = module.to(device).eval()
        self.spec = spec
        self.device = device
        self.eos_id = gen.eos_id
        self.vocab_size = gen.vocab_size
        self.max_context = gen.max_context

    def encode(self, text: str) -> list[int]:
        return encode(text)

    def detokenizer(self) -> Detokenizer:
        return Detokenizer()

    def _run(self, tokens: Any, state: State) -> tuple[Any, State]:
        import torch  # noqa: PLC0415

        out = self.module.step(tokens, state)
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.Tensor)):
            raise ModelContractError(f"{self.spec.builder}.step must return (logits, state); got {type(out).__name__}")
        logits, state = out
        b, t = tokens.shape
        if tuple(logits.shape) != (b, t, self.vocab_size):
            raise ModelContractError(
                f"{self.spec.builder}.step returned logits of shape {list(logits.shape)} for tokens of shape "
                f"{[b, t]}; expected {[b, t, self.vocab_size]} (batch, time, vocabulary)"
            )
        return logits, state

    def prefill(self, ids: Sequence[int]) -> tuple[Any, State]:
        """(logits [V] after the last prompt token, the state of this one sequence)."""
        import torch  # noqa: PLC0415

        ids = list(ids)
        if not ids:
            raise InvalidInput(422, "the prompt is empty: send at least one character")
        if len(ids) > self.max_context:
            raise InvalidInput(
                413, f"the prompt is {len(ids)} tokens; this model takes at most {self.max_context}: shorten it"
            )
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise InvalidInput(422, f"token ids must be in [0, {self.vocab_size})")
        with torch.inference_mode():
            tokens = torch.tensor([ids], dtype=torch.long, device=self.device)
            logits, state = self._run(tokens, self.module.init_state(1))
            return logits[0, -1].float(), state

    def step(self, last_tokens: Any, states: State) -> tuple[Any, State]:
        """One decoding step for a batch: tokens [B] and their stacked states -> (logits [B, V], states)."""
        import torch  # noqa: PLC0415

        with torch.inference_mode():
            tokens = torch.as_tensor(last_tokens, dtype=torch.long, device=self.device).reshape(-1, 1)
            logits, states = self._run(tokens, states)
            return logits[:, -1].float(), states

    def stack(self, states: Sequence[State]) -> State:
        """One batched state from per-sequence states (each of batch 1), in order."""
        import torch  # noqa: PLC0415

        dim = self.state_batch_dim
        with torch.inference_mode():
            if isinstance(states[0], tuple):
                return tuple(torch.cat([s[k] for s in states], dim=dim) for k in range(len(states[0])))
            return torch.cat(list(states), dim=dim)

    def unstack(self, batched: State) -> list[State]:
        """Per-sequence states (batch 1 each) from a batched one; copies, so a finished batch can be freed."""
        import torch  # noqa: PLC0415

        dim = self.state_batch_dim
        with torch.inference_mode():
            if isinstance(batched, tuple):
                parts = [t.split(1, dim=dim) for t in batched]
                return [tuple(p[i].clone() for p in parts) for i in range(len(parts[0]))]
            return [s.clone() for s in batched.split(1, dim=dim)]

    def sample(self, logits: Any, temperatures: Sequence[float], generators: Sequence[Any]) -> list[int]:
        """One token per row of `logits` [B, V]: argmax at temperature 0, else a draw from softmax(logits / t).

        Each row draws from its own `torch.Generator` (or the global one when None), one uniform per draw,
        so a seeded request gets the same tokens whatever other requests share its batch.
        """
        import torch  # noqa: PLC0415

        if not (len(logits) == len(temperatures) == len(generators)):
            raise ValueError(
                f"{len(logits)} rows of logits, {len(temperatures)} temperatures, {len(generators)} generators"
            )
        out = []
        with torch.inference_mode():
            for row, t, g in zip(logits, temperatures, generators, strict=True):
                if not (isinstance(t, int | float) and math.isfinite(t) and t >= 0):
                    raise InvalidInput(422, f"temperature={t!r}: a finite number >= 0 (0 is greedy)")
                if t == 0:
                    out.append(int(row.argmax()))
                    continue
                # float64 on CPU: a row's cumulative distribution must not depend on the device or batch
                cdf = torch.softmax(row.double().cpu() / t, dim=0).cumsum(0)
                u = torch.rand((), dtype=torch.float64, generator=g) * cdf[-1]
                out.append(min(int(torch.searchsorted(cdf, u, right=True)), len(cdf) - 1))
        return out

    def generate(
        self,
        prompt: str,
        max_tokens: int = 64,
        temperature: float = 0.0,
        seed: int | None = None,
        stops: Sequence[str] = (),
    ) -> str:
        """The continuation of `prompt` (one sequence): up to `max_tokens`, EOS, a stop string or the context."""
        import torch  # noqa: PLC0415

        ids = self.encode(prompt)
        logits, state = self.prefill(ids)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        detok, stop = Detokenizer(), StopMatcher(stops)
        text = []
        for _ in range(min(max_tokens, self.max_context - len(ids))):
            token = self.sample(logits[None], [temperature], [gen])[0]
            if token == self.eos_id:
                break
            piece, stopped = stop.push(detok.push(token))
            text.append(piece)
            if stopped:
                return "".join(text)
            logits, state = self.step([token], state)
            logits = logits[0]
        return "".join(text) + stop.push(detok.flush())[0] + stop.flush()


def load_generator(bundle_or_source: Tensors | ModelSource, device: str = "cpu") -> Generator:
    """A `Generator` from a bundle, or from a `ModelSource` (artifact store or registry, digest-checked)."""
    if isinstance(bundle_or_source, ModelSource):
        from serving.loading import load_bundle  # noqa: PLC0415

        bundle_or_source = load_bundle(bundle_or_source)
    module, spec = load_any(bundle_or_source)
    return Generator(module, spec, device)


# -- the bundle --------------------------------------------------------------------------------------
def generator_model(
    module: Any,
    *,
    builder: str | Callable[..., Any],
    max_context: int,
    example_prompt: str,
    args: Mapping[str, Any] | None = None,
    tokenizer: str = "bytes",
    info: Mapping[str, Any] | None = None,
) -> Tensors:
    """A trained generator as a pickle-free bundle a training stage returns (`serving.contract` for the rest).

    Checked here, inside the stage: the module implements the protocol, `builder(**args)` rebuilds it and
    takes the weights, and the rebuilt model prefills `example_prompt` and takes a few decoding steps with
    finite logits over the tokenizer's vocabulary, batched or not.
    """
    import torch  # noqa: PLC0415
    from torch import nn  # noqa: PLC0415

    if not isinstance(module, nn.Module):
        raise ModelContractError(f"generator_model needs a torch nn.Module, got {type(module).__name__}")
    if tokenizer not in TOKENIZERS:
        raise ModelContractError(f"tokenizer={tokenizer!r}: use one of {TOKENIZERS}")
    if isinstance(max_context, bool) or not isinstance(max_context, int) or max_context < 2:
        raise ModelContractError(f"max_context={max_context!r}: the most tokens the model takes, an int >= 2")
    if not isinstance(example_prompt, str) or not example_prompt or len(example_prompt) > MAX_EXAMPLE_PROMPT:
        raise ModelContractError(f"example_prompt: a non-empty string of at most {MAX_EXAMPLE_PROMPT} characters")
    if len(encode(example_prompt)) >= max_context:
        raise ModelContractError(f"example_prompt is {len(encode(example_prompt))} tokens; max_context={max_context}")
    dim = _check_protocol(module, getattr(builder, "__qualname__", str(builder)))
    try:
        json_args = json.loads(json.dumps(dict(args or {}), allow_nan=False))
        json_info = json.loads(json.dumps(dict(info or {}), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ModelContractError(f"args and info must be JSON-serialisable (plain numbers/strings): {exc}") from None
    ref, files = code_reference(builder)
    generation = GenerationSpec(tokenizer, BYTES_VOCAB, EOS_ID, max_context, example_prompt, dim)
    spec = ModelSpec(
        builder=ref,
        task="generator",
        input=None,
        outputs=BYTES_VOCAB,
        args=json_args,
        info=json_info,
        generation=generation,
    )
    tensors = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    metadata = {CONFIG_KEY: json.dumps(spec.to_config())}
    if files:
        metadata[CODE_KEY] = json.dumps(files)
    bundle = Tensors(tensors, metadata)
    gen = load_generator(bundle)
    try:  # the stage fails here, not at registration or in a replica
        _smoke(gen, torch)
    except ModelContractError:
        raise
    except Exception as exc:
        raise ModelContractError(
            f"{ref} failed on its example prompt, alone or batched ({type(exc).__name__}: {exc}); check init_state "
            "and step against the generator protocol (docs/models.md)"
        ) from exc
    return bundle


def _smoke(gen: Generator, torch: Any) -> None:
    """Prefill the example prompt, then decode a few steps alone and batched with a copy: same logits."""
    prompt = gen.encode(gen.spec.generation.example_prompt)  # type: ignore[union-attr]
    logits, state = gen.prefill(prompt)
    batched = gen.stack([state, state])
    if [tuple(s.shape) for s in _flat(gen.unstack(batched)[0])] != [tuple(s.shape) for s in _flat(state)]:
        raise ModelContractError(
            f"{gen.spec.builder}: stacking two states along state_batch_dim={gen.state_batch_dim} and splitting "
            "them again changes their shape; set state_batch_dim to the state's batch dimension"
        )
    for _ in range(SMOKE_TOKENS):
        if not torch.isfinite(logits).all():
            raise ModelContractError(f"{gen.spec.builder} gives non-finite logits on the example prompt")
        token = int(logits.argmax())
        logits, state = gen.step([token], state)
        both, batched = gen.step([token, token], batched)
        if not torch.allclose(both[0], logits[0], atol=1e-4) or not torch.allclose(both[1], logits[0], atol=1e-4):
            raise ModelContractError(
                f"{gen.spec.builder}: a batch of two copies of a sequence gives other logits than the sequence "
                f"alone; step must treat batch rows independently along state_batch_dim={gen.state_batch_dim}"
            )
        logits = logits[0]


def _flat(state: State) -> list[Any]:
    return list(state) if isinstance(state, tuple) else [state]
