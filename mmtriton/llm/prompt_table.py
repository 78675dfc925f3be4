"""The input embedding that serves a packed batch's prompt-table rows (the transformers engine)."""

from __future__ import annotations

import torch
from torch import nn


class PromptTableEmbedding(nn.Module):
    """Input embedding that also serves rows of a shared prompt table.

    Ids ``< vocab_size`` go through the model's own embedding; ids ``>= vocab_size``
    read row ``(id - vocab_size) % capacity`` of :attr:`table`. The forward pass has
    no data-dependent control flow, so it is CUDA-graph capturable, and :attr:`table`
    is only ever written in place, so captured graphs stay valid.

    Args:
        base: The model's original input embedding.
        vocab_size: Number of real token ids.
        capacity: Rows of the shared table (may be 0: no prompt tables).
    """

    def __init__(self, base: nn.Embedding, vocab_size: int, capacity: int) -> None:
        super().__init__()
        self.base = base
        self.vocab_size = vocab_size
        self.capacity = capacity
        weight = base.weight
        self.register_buffer(
            "table",
            torch.zeros(max(capacity, 1), weight.shape[1], dtype=weight.dtype, device=weight.device),
            persistent=False,
        )

    @property
    def weight(self) -> nn.Parameter:
        """The real-token embedding matrix (for code that inspects ``get_input_embeddings().weight``)."""
        return self.base.weight

    @property
    def num_embeddings(self) -> int:
        """Number of real token ids."""
        return self.vocab_size

    @property
    def embedding_dim(self) -> int:
        """Hidden size."""
        return self.base.weight.shape[1]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embed real and virtual ids.

        Args:
            input_ids: Integer ids of any shape.

        Returns:
            Embeddings of shape ``input_ids.shape + (hidden,)``.
        """
        is_virtual = input_ids >= self.vocab_size
        real = self.base(torch.where(is_virtual, torch.zeros_like(input_ids), input_ids))
        if self.capacity == 0:
            return real
        rows = torch.where(is_virtual, (input_ids - self.vocab_size) % self.capacity, torch.zeros_like(input_ids))
        virtual = self.table[rows.long()]
        return torch.where(is_virtual.unsqueeze(-1), virtual, real)
