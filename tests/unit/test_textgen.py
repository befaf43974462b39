"""The textgen built-in's pieces without Ray: its corpus, its stream lanes, its bits-per-byte metric."""

import math

import pyarrow as pa
import torch

from serving.generation import EOS_ID, decode
from workflows.builtin import textgen as tg
from workflows.builtin.docstrings import MIN_DOC_CHARS


def test_corpus_is_deterministic_standard_library_text():
    docs = tg.collect_docstrings()
    assert docs == tg.collect_docstrings()
    names = [q for q, _ in docs]
    assert len(set(names)) == len(names) and len({t for _, t in docs}) == len(docs)
    assert {q.split(".")[0] for q in names} <= {m.split(".")[0] for m in tg.MODULES}
    assert all(len(t) >= MIN_DOC_CHARS and t == t.strip() and "\n\n\n" not in t for _, t in docs)
    assert sum(len(t.encode()) for _, t in docs) > 100_000  # enough text to learn from in a minute
    held = [q for q, _ in docs if tg._held_out(q, 0.1)]
    assert 0.05 < len(held) / len(docs) < 0.15


def test_stream_ends_each_docstring_with_eos_and_lanes_are_contiguous():
    table = pa.table(
        {"name": ["a", "b", "c"], "text": ["héllo", "world", "x"], "split": ["train", "train", "held_out"]}
    )
    ids = tg.token_stream(table, "train")
    assert ids.tolist().count(EOS_ID) == 2 and decode(ids.tolist()) == "héllo" + "world"
    lanes = tg._lanes(torch.arange(23), 4, offset=2)
    assert lanes.shape == (4, 5) and lanes[1].tolist() == [7, 8, 9, 10, 11]


class Uniform(torch.nn.Module):
    """Equal logits for every id: exactly log2(257) bits per byte."""

    def init_state(self, batch: int) -> torch.Tensor:
        return torch.zeros(1, batch, 1)

    def step(self, tokens: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(*tokens.shape, tg.VOCAB), state


def test_bits_per_byte_of_a_uniform_guess_is_log2_of_the_vocabulary():
    ids = torch.randint(0, 256, (1000,), generator=torch.Generator().manual_seed(0))
    assert math.isclose(tg.bits_per_byte(Uniform(), ids, lanes=3, seq_len=50), math.log2(257), rel_tol=1e-6)
