"""Vision and audio encoders that map raw features to LLM prompt-table embeddings.

Both modules are small pre-norm transformers followed by a two-layer projector
into the LLM's hidden size. Attention is written out (matmul + masked softmax)
rather than using ``nn.MultiheadAttention`` so the TorchScript ONNX exporter
emits plain ops and padded keys get exactly zero weight.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mmtriton.spec import AudioSpec, VisionSpec

__all__ = ["AudioEncoder", "VisionEncoder", "subsampled_lengths"]


class _SelfAttention(nn.Module):
    """Multi-head self-attention with an optional key-padding mask."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """Attend over the sequence.

        Args:
            x: Float [B, T, H].
            key_mask: Bool [B, T], True for keys that may be attended to; None for all.

        Returns:
            Float [B, T, H].
        """
        b, t, h = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = torch.matmul(q * (1.0 / math.sqrt(self.head_dim)), k.transpose(-1, -2))
        if key_mask is not None:
            # A finite fill (not -inf) keeps fully masked rows NaN-free; exp() of it
            # underflows to exactly 0, so masked keys contribute nothing.
            scores = scores.masked_fill(~key_mask[:, None, None, :], torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1)
        ctx = torch.matmul(weights, v).transpose(1, 2).reshape(b, t, h)
        return self.out(ctx)


class _Block(nn.Module):
    """Pre-norm transformer block: LN -> attention -> residual, LN -> MLP (4x, GELU) -> residual."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size)
        self.attn = _SelfAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, 4 * hidden_size),
            nn.GELU(),
            nn.Linear(4 * hidden_size, hidden_size),
        )

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """Apply the block.

        Args:
            x: Float [B, T, H].
            key_mask: Bool [B, T] key-padding mask, or None.

        Returns:
            Float [B, T, H].
        """
        x = x + self.attn(self.norm1(x), key_mask)
        return x + self.mlp(self.norm2(x))


def _projector(hidden_size: int, llm_hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(hidden_size, llm_hidden), nn.GELU(), nn.Linear(llm_hidden, llm_hidden))


def _init_weights(module: nn.Module, generator: torch.Generator | None, std: float = 0.02) -> None:
    """Re-initialise every parameter: normal(0, std) weights, zero biases, unit LayerNorm."""
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, nn.LayerNorm):
                sub.weight.fill_(1.0)
                sub.bias.zero_()
            elif isinstance(sub, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                sub.weight.normal_(0.0, std, generator=generator)
                if sub.bias is not None:
                    sub.bias.zero_()


def subsampled_lengths(lengths: Tensor, steps: int) -> Tensor:
    """Valid lengths after ``steps`` stride-2 convolutions (kernel 3, padding 1).

    Uses ``(L + 1) // 2``, equal to ``(L - 1) // 2 + 1`` for ``L >= 1`` and 0 for
    ``L == 0``; with a non-negative numerator floor and truncating division agree,
    so the exported ONNX graph gives the same result as PyTorch.

    Args:
        lengths: Int64 [B], non-negative.
        steps: Number of stride-2 convolutions.

    Returns:
        Int64 [B].
    """
    for _ in range(steps):
        lengths = torch.div(lengths + 1, 2, rounding_mode="floor")
    return lengths


def _sinusoids(length: int, dim: int) -> Tensor:
    position = torch.arange(length, dtype=torch.float64)[:, None]
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq)[:, : dim // 2]
    return table.to(torch.float32)


class VisionEncoder(nn.Module):
    """ViT-style image encoder: one embedding per patch, projected to the LLM width.

    Args:
        spec: Vision section of the model spec.
        llm_hidden: Hidden size of the LLM the embeddings are fed to.
        generator: Random generator for the initial weights; None uses the global RNG.
    """

    def __init__(self, spec: VisionSpec, llm_hidden: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.image_size = spec.image_size
        self.patch_embed = nn.Conv2d(3, spec.hidden_size, kernel_size=spec.patch_size, stride=spec.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, spec.tokens_per_image, spec.hidden_size))
        self.blocks = nn.ModuleList(_Block(spec.hidden_size, spec.num_heads) for _ in range(spec.num_layers))
        self.norm = nn.LayerNorm(spec.hidden_size)
        self.projector = _projector(spec.hidden_size, llm_hidden)
        _init_weights(self, generator)
        with torch.no_grad():
            self.pos_embed.normal_(0.0, 0.02, generator=generator)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """Encode normalised images.

        Args:
            pixel_values: Float [B, 3, S, S] with S = ``spec.image_size``.

        Returns:
            Float [B, tokens_per_image, llm_hidden].
        """
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.projector(self.norm(x))


class AudioEncoder(nn.Module):
    """Conv-subsampling + transformer audio encoder over MFCC frames.

    Rows of a batch may have different lengths; padded frames never influence
    the valid outputs, and padded output rows are zero.

    Args:
        spec: Audio section of the model spec.
        llm_hidden: Hidden size of the LLM the embeddings are fed to.
        generator: Random generator for the initial weights; None uses the global RNG.
    """

    def __init__(self, spec: AudioSpec, llm_hidden: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.steps = spec.subsampling.bit_length() - 1
        channels = [spec.n_mfcc] + [spec.hidden_size] * self.steps
        self.convs = nn.ModuleList(
            nn.Conv1d(channels[i], channels[i + 1], kernel_size=3, stride=2, padding=1) for i in range(self.steps)
        )
        self.act = nn.GELU()
        self.register_buffer(
            "pos_table", _sinusoids(spec.tokens(spec.max_frames), spec.hidden_size), persistent=False
        )
        self.blocks = nn.ModuleList(_Block(spec.hidden_size, spec.num_heads) for _ in range(spec.num_layers))
        self.norm = nn.LayerNorm(spec.hidden_size)
        self.projector = _projector(spec.hidden_size, llm_hidden)
        _init_weights(self, generator)

    def forward(self, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Encode padded MFCC batches.

        Args:
            features: Float [B, T, n_mfcc]; frames at or past ``lengths[b]`` are padding.
            lengths: Int64 [B], valid frames per row.

        Returns:
            ``(embeddings, out_lengths)``: float [B, T', llm_hidden] with
            T' = ``spec.tokens(T)`` (rows past ``out_lengths[b]`` are zero), and
            int64 [B] valid output rows per batch entry.
        """
        lengths = lengths.to(torch.int64).clamp(min=0)
        x = features.transpose(1, 2)
        # Zero padding before every conv: the kernel's right tap at the last valid
        # position reads one frame past the end, which must be 0 as for a lone row.
        x = x * self._valid(lengths, x.shape[2]).unsqueeze(1).to(x.dtype)
        for conv in self.convs:
            x = self.act(conv(x))
            lengths = subsampled_lengths(lengths, 1)
            x = x * self._valid(lengths, x.shape[2]).unsqueeze(1).to(x.dtype)
        x = x.transpose(1, 2)
        x = x + self.pos_table[: x.shape[1]]
        key_mask = self._valid(lengths, x.shape[1])
        for block in self.blocks:
            x = block(x, key_mask)
        x = self.projector(self.norm(x))
        return x * key_mask.unsqueeze(-1).to(x.dtype), lengths

    @staticmethod
    def _valid(lengths: Tensor, size: int | Tensor) -> Tensor:
        """Bool [B, size], True where the position index is below the row's length."""
        positions = torch.arange(size, device=lengths.device)
        return positions.unsqueeze(0) < lengths.unsqueeze(1)
