"""The generative job: standard-library docstrings -> preprocess (CPU) -> train a byte-level GRU language
model (GPU, CPU fallback) -> evaluate (held-out bits per byte gate) -> serve (streamed generation)."""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 257  # the `bytes` tokenizer: 256 byte ids + end of sequence (serving.generation)


class ByteGRU(nn.Module):
    """Embedding -> GRU -> linear head over bytes; implements the generator protocol (docs/models.md)."""

    state_batch_dim = 1  # h: [layers, B, hidden]

    def __init__(self, embed: int = 96, hidden: int = 256, layers: int = 1) -> None:
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
