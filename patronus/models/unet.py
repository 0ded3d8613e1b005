"""Denoiser ε_θ(x_t, t, s): a diffusers UNet2DModel whose time embedding is shifted by MLP(s)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import UNet2DModel
from torch import nn


class ConditionedUNet(nn.Module):
    """s (B, K) -> standardise -> MLP -> added to the time embedding every ResBlock sees (Patronus §3).

    diffusers' `class_embed_type="identity"` adds `class_labels` to the time embedding, so the
    MLP output is passed there. The condition is keyword-only and required: forgetting it is an
    error, never a silent self-encoding of the noisy input.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        num_prototypes: int,
        block_out_channels: Sequence[int] = (64, 128, 256, 256),
        layers_per_block: int = 2,
        attention_levels: Sequence[bool] = (False, False, True, False),
        mid_attention: bool = True,
        norm_num_groups: int = 8,
    ):
        super().__init__()
        if len(attention_levels) != len(block_out_channels):
            raise ValueError(
                f"attention_levels has {len(attention_levels)} entries but block_out_channels has "
                f"{len(block_out_channels)}; give one bool per resolution level"
            )
        down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels)
        up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels))
        self.unet = UNet2DModel(
            sample_size=image_size,
            in_channels=in_channels,
            out_channels=in_channels,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            down_block_types=down,
            up_block_types=up,
            norm_num_groups=norm_num_groups,
            add_attention=mid_attention,
            class_embed_type="identity",
            attention_head_dim=None,
        )
        emb_dim = block_out_channels[0] * 4  # UNet2DModel's time_embed_dim
        # Per-prototype standardisation first: raw log-similarities sit around 1e-2 with much
        # smaller spread between images, too faint for the MLP to pick up (and the encoder then
        # gets almost no gradient). Running statistics make it a fixed affine map at inference,
        # so edits of s pass through unchanged in meaning.
        self.cond_mlp = nn.Sequential(
            nn.BatchNorm1d(num_prototypes, affine=False),
            nn.Linear(num_prototypes, emb_dim),
            nn.SiLU(),
            nn.Linear(emb_dim, emb_dim),
        )

    # Named views of `cond_mlp`'s layers (the state-dict keys stay cond_mlp.N, so checkpoints load as before).
    @property
    def condition_norm(self) -> nn.BatchNorm1d:
        """The per-prototype standardisation of s (running statistics, no affine parameters)."""
        return self.cond_mlp[0]

    @property
    def condition_input(self) -> nn.Linear:
        """The first linear layer of the condition MLP: its weight column k (emb_dim,) is all the
        denoiser reads of prototype k's standardised activation."""
        return self.cond_mlp[1]

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, *, s: torch.Tensor) -> torch.Tensor:
        """ε̂(x_t, t, s)."""
        if s is None:
            raise ValueError("the denoiser needs the prototype activations s; encode a clean image first")
        if s.ndim != 2 or s.shape[0] != x_t.shape[0]:
            raise ValueError(f"s must have shape (batch={x_t.shape[0]}, K), got {tuple(s.shape)}")
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        return self.unet(x_t, t, class_labels=self.cond_mlp(s)).sample
