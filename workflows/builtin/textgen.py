"""The generative job: Python standard-library docstrings -> preprocess (CPU) -> train a byte-level GRU language
model (GPU, CPU fallback) -> evaluate (held-out bits per byte gate) -> serve (streamed generation).

The corpus needs no download: the docstrings of a fixed list of standard-library modules, collected in a fixed
order. It is the same on every machine with the same Python version (recorded with its hash), since the
standard library's docstrings change only between Python releases.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import nn

from actors.context import StageContext
from serving.generation import EOS_ID, encode, generator_model, load_generator
from storage import Tensors
from workflows.errors import GateFailed
from workflows.model import Workflow, stage
from workflows.serve_stage import serve_model

VOCAB = 257  # the `bytes` tokenizer: 256 byte ids + end of sequence (serving.generation)
# Pure-Python or platform-independent modules only (os, subprocess, shutil document per-platform code).
MODULES = (
    *("abc", "argparse", "bisect", "calendar", "collections", "configparser", "contextlib", "copy", "csv"),
    *("dataclasses", "difflib", "enum", "fractions", "functools", "heapq", "html", "inspect", "itertools"),
    *("json", "logging", "numbers", "operator", "pathlib", "pprint", "queue", "random", "re", "sched", "shlex"),
    *("statistics", "string", "textwrap", "threading", "typing", "urllib.parse", "zipfile"),
)
PROMPT = "Return the "


class ByteGRU(nn.Module):
    """Embedding -> GRU -> linear head over bytes; implements the generator protocol (docs/models.md)."""

    state_batch_dim = 1  # h: [layers, B, hidden]

    def __init__(self, embed: int = 64, hidden: int = 192, layers: int = 1) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, embed)
        self.gru = nn.GRU(embed, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, VOCAB)

    def init_state(self, batch: int) -> torch.Tensor:
        w = self.head.weight
        return torch.zeros(self.gru.num_layers, batch, self.gru.hidden_size, dtype=w.dtype, device=w.device)

    def step(self, tokens: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, h = self.gru(self.embed(tokens), state)
        return self.head(y), h


# -- the corpus ----------------------------------------------------------------------------------------
def collect_docstrings(modules: tuple[str, ...] = MODULES) -> list[tuple[str, str]]:
    """(qualified name, cleaned docstring) of `modules`, read by a fresh interpreter that imports nothing else
    (-I -S: no site-packages; importing ray, for one, replaces inspect.isgenerator)."""
    script = Path(__file__).with_name("docstrings.py")
    out = subprocess.run(
        [sys.executable, "-I", "-S", str(script), *modules], capture_output=True, text=True, timeout=120, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"collecting docstrings failed: {out.stderr.strip()[-2000:]}")
    return [(q, t) for q, t in json.loads(out.stdout)]


def _held_out(qualname: str, fraction: float) -> bool:
    """A stable split by name: the same docstring is held out on every machine and in every run."""
    return int(hashlib.sha256(qualname.encode()).hexdigest()[:8], 16) / 16**8 < fraction


@stage(cpus=1)
def preprocess(ctx: StageContext, held_out: float = 0.1) -> pa.Table:
    """Collect the docstrings, split them into train/held-out by a hash of their name; one row each (Arrow)."""
    if not 0 < held_out < 1:
        raise ValueError(f"held_out={held_out!r}: the held-out share of docstrings, between 0 and 1 (e.g. 0.1)")
    docs = collect_docstrings()
    digest = hashlib.sha256(json.dumps(docs).encode()).hexdigest()
    python = ".".join(map(str, sys.version_info[:2]))
    ctx.log_source("python-docstrings", f"python{python} stdlib: {' '.join(MODULES)}", digest, num_rows=len(docs))
    split = ["held_out" if _held_out(q, held_out) else "train" for q, _ in docs]
    table = pa.table({"name": [q for q, _ in docs], "text": [t for _, t in docs], "split": split})
    table = table.replace_schema_metadata({"source_sha256": digest, "python": python, "modules": " ".join(MODULES)})
    for part in ("train", "held_out"):
        texts = [t for (_, t), s in zip(docs, split, strict=True) if s == part]
        ctx.log_metrics({f"docs_{part}": len(texts), f"bytes_{part}": sum(len(t.encode()) for t in texts)})
    return table


def token_stream(table: pa.Table, split: str) -> torch.Tensor:
    """The split's docstrings as one id stream, each followed by EOS (so the model learns where text ends)."""
    texts = table.filter(pc.equal(table["split"], split))["text"].to_pylist()
    if not texts:
        raise ValueError(f"the {split} split is empty: change preprocess.held_out")
    return torch.tensor([i for t in texts for i in [*encode(t), EOS_ID]], dtype=torch.long)


def _lanes(ids: torch.Tensor, batch: int, offset: int = 0) -> torch.Tensor:
    """`batch` contiguous lanes of the stream [batch, n]: lane b continues where its last chunk ended."""
    n = (len(ids) - offset) // batch
    return ids[offset : offset + n * batch].view(batch, n)


# -- training and evaluation ---------------------------------------------------------------------------
@stage(cpus=1, gpus=1, fallback="cpu", register_model="tierflow-textgen")
def train(
    ctx: StageContext,
    preprocess: pa.Table,
    steps: int = 450,
    seq_len: int = 128,
    batch_size: int = 32,
    embed: int = 64,
    hidden: int = 192,
    layers: int = 1,
    lr: float = 4e-3,
    seed: int = 0,
    max_context: int = 1024,
) -> Tensors:
    """Next-byte prediction with truncated backpropagation through time: `batch_size` lanes of the training
    stream, `seq_len` bytes per step, the hidden state carried across steps (and reset each pass)."""
    torch.manual_seed(seed)
    device = torch.device(ctx.device)
    data = token_stream(preprocess, "train")
    model = ByteGRU(embed, hidden, layers).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    started, step, lanes, pos, h = time.monotonic(), 0, None, 0, None
    while step < steps:
        if lanes is None or pos + seq_len + 1 > lanes.shape[1]:  # a new pass, its lanes shifted at random
            offset = int(torch.randint(0, seq_len, (), generator=gen))
            lanes, pos, h = _lanes(data, batch_size, offset).to(device), 0, model.init_state(batch_size)
            if lanes.shape[1] < seq_len + 1:
                raise ValueError(f"the training text is too short for batch_size={batch_size}, seq_len={seq_len}")
        chunk = lanes[:, pos : pos + seq_len + 1]
        logits, h = model.step(chunk[:, :-1], h.detach())
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), chunk[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ctx.log_metric("train_bits_per_byte", loss.item() / math.log(2), step)
        pos, step = pos + seq_len, step + 1
    seconds = time.monotonic() - started
    ctx.log_metric("train_seconds", seconds)
    meta = preprocess.schema.metadata or {}
    return generator_model(
        model.cpu().eval(),
        builder="workflows.builtin.textgen:ByteGRU",
        args={"embed": embed, "hidden": hidden, "layers": layers},
        max_context=max_context,
        example_prompt=PROMPT,
        info={
            "description": "byte-level GRU language model of Python standard-library docstrings",
            "corpus_sha256": meta.get(b"source_sha256", b"").decode(),
            "train_steps": steps,
            "train_seconds": round(seconds, 2),
        },
    )


def bits_per_byte(model: Any, ids: torch.Tensor, lanes: int = 8, seq_len: int = 256) -> float:
    """Mean next-token loss in bits over a stream, read in `lanes` contiguous lanes with the state carried."""
    data = _lanes(ids, min(lanes, max(1, (len(ids) - 1) // 2)))
    total, count, h = 0.0, 0, model.init_state(data.shape[0])
    with torch.inference_mode():
        for pos in range(0, data.shape[1] - 1, seq_len):
            chunk = data[:, pos : pos + seq_len + 1]
            logits, h = model.step(chunk[:, :-1], h)
            total += float(
                nn.functional.cross_entropy(logits.reshape(-1, VOCAB), chunk[:, 1:].reshape(-1), reduction="sum")
            )
            count += chunk[:, 1:].numel()
    return total / count / math.log(2)


@stage(cpus=1, gate=True)
def evaluate(
    ctx: StageContext,
    preprocess: pa.Table,
    train: Tensors,
    max_bits_per_byte: float = 3.0,
    sample_tokens: int = 80,
    sample_temperature: float = 0.7,
) -> dict[str, Any]:
    """Held-out bits per byte of the exact artifact that will be served (lower is better; 8.0 is a uniform
    guess over 257 ids); a gate. Also records continuations of the example prompt: greedy (a small model
    soon repeats itself) and sampled at `sample_temperature` with seed 0."""
    gen = load_generator(train)
    held = token_stream(preprocess, "held_out")
    bpb = bits_per_byte(gen.module, held)
    greedy = PROMPT + gen.generate(PROMPT, max_tokens=sample_tokens)
    sampled = PROMPT + gen.generate(PROMPT, max_tokens=sample_tokens, temperature=sample_temperature, seed=0)
    ctx.log_metric("held_out_bits_per_byte", bpb)
    ctx.set_tag("tierflow.sample", json.dumps(greedy))
    ctx.set_tag("tierflow.sample_sampled", json.dumps(sampled))
    if not bpb <= max_bits_per_byte:
        raise GateFailed(
            f"held-out loss {bpb:.3f} bits per byte is above the threshold max_bits_per_byte={max_bits_per_byte}; "
            "the model is not served. Train longer (-p train.steps=...) or, to accept it, raise "
            "-p evaluate.max_bits_per_byte"
        )
    return {"held_out_bits_per_byte": bpb, "max_bits_per_byte": max_bits_per_byte, "held_out_tokens": len(held),
            "sample": greedy, "sample_sampled": sampled}  # fmt: skip


serve = serve_model("train", after=["evaluate"])


textgen = Workflow(
    "textgen",
    [preprocess, train, evaluate, serve],
    description="stdlib docstrings: preprocess -> train a byte-level GRU (GPU or CPU) -> evaluate (bits/byte) -> serve",
)
