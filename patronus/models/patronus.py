"""PatronusModel: prototype encoder + conditioned denoiser + noise schedule, saved as one unit."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Optional

import torch
from diffusers import ConfigMixin, DDPMScheduler, ModelMixin
from diffusers.configuration_utils import register_to_config

from patronus.models.prototypes import PrototypeEncoder
from patronus.models.unet import ConditionedUNet


class PatronusModel(ModelMixin, ConfigMixin):
    """Everything needed to encode, sample, invert and edit — and nothing about training.

    The constructor arguments are the config schema (LightningCLI reads them from the type
    hints) and are stored with the weights, so `from_pretrained(dir)` needs nothing else.
    The defaults are the paper's (Patronus §4: T=1000, linear β 1e-4→0.02, UNet 64·(1,2,4,4),
    2 blocks per level, D=128, MLP(s) added to the time embedding); each option's comment says
    what its off value means.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        image_size: int = 32,  # side of the square images, in pixels
        in_channels: int = 1,  # image channels (1 grey, 3 RGB)
        num_prototypes: int = 30,  # K; the paper uses 30 for MNIST-like data, 100 otherwise
        prototype_dim: int = 128,  # D of the encoder's feature cells and the prototypes
        encoder_layout: str = "paper32",  # a Conv->ReLU layout of ENCODER_LAYOUTS; ignored with a backbone
        backbone: Optional[str] = None,  # a timm model name as the encoder; None = the conv layout
        backbone_weights: Optional[str] = None,  # local weights file of the backbone; None = random init
        backbone_out_index: int = 2,  # which feature level of the backbone the prototypes match
        position_weight: float = 0.0,  # λ of position-aware prototypes (`PrototypeEncoder.distance_maps`); 0 = position-free
        block_out_channels: Sequence[int] = (64, 128, 256, 256),  # UNet channels per resolution level
        layers_per_block: int = 2,  # ResBlocks per UNet level
        attention_levels: Sequence[bool] = (False, False, True, False),  # self-attention per level; all False = none
        mid_attention: bool = True,  # self-attention in the UNet's middle block; False = none
        norm_num_groups: int = 8,  # GroupNorm groups in the UNet
        prediction: Literal["epsilon", "v"] = "epsilon",  # what the UNet outputs: ε, or v read back as ε (`forward`)
        num_train_timesteps: int = 1000,  # T of the training schedule
        beta_schedule: str = "linear",  # β_t schedule: linear, scaled_linear or squaredcos_cap_v2
        beta_start: float = 1e-4,  # β_1
        beta_end: float = 0.02,  # β_T
    ):
        super().__init__()
        for name, value in (
            ("image_size", image_size),
            ("in_channels", in_channels),
            ("num_prototypes", num_prototypes),
            ("prototype_dim", prototype_dim),
            ("num_train_timesteps", num_train_timesteps),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model.net.{name}={value!r}; expected an integer >= 1")
        if image_size % 2 ** (len(block_out_channels) - 1):
            raise ValueError(
                f"image_size={image_size} must be divisible by 2**(len(block_out_channels)-1)="
                f"{2 ** (len(block_out_channels) - 1)} for the UNet's downsampling"
            )
        if prediction not in ("epsilon", "v"):
            raise ValueError(f"model.net.prediction={prediction!r}; expected 'epsilon' or 'v'")
        if beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
            raise ValueError(f"beta_schedule={beta_schedule!r}; expected linear, scaled_linear or squaredcos_cap_v2")
        self.encoder = PrototypeEncoder(
            in_channels=in_channels,
            image_size=image_size,
            num_prototypes=num_prototypes,
            prototype_dim=prototype_dim,
            layout=encoder_layout,
            backbone=backbone,
            backbone_weights=backbone_weights,
            backbone_out_index=backbone_out_index,
            position_weight=position_weight,
        )
        self.denoiser = ConditionedUNet(
            image_size=image_size,
            in_channels=in_channels,
            num_prototypes=num_prototypes,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            attention_levels=attention_levels,
            mid_attention=mid_attention,
            norm_num_groups=norm_num_groups,
        )
        # ᾱ_t of the training schedule, for the v-parameterised output (derived from the config, not saved).
        self.register_buffer("alphas_cumprod", self.noise_scheduler().alphas_cumprod.float(), persistent=False)

    def noise_scheduler(self) -> DDPMScheduler:
        """The training schedule; DDIM/inverse schedulers are built `from_config` of this one."""
        c = self.config
        return DDPMScheduler(
            num_train_timesteps=c.num_train_timesteps,
            beta_schedule=c.beta_schedule,
            beta_start=c.beta_start,
            beta_end=c.beta_end,
            clip_sample=True,
        )

    def encode(self, x0: torch.Tensor) -> torch.Tensor:
        """Prototype activations s (B, K) of clean images in [-1, 1] (`PrototypeEncoder.encode`)."""
        return self.encoder.encode(x0)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, *, s: torch.Tensor) -> torch.Tensor:
        """Predicted noise ε_θ(x_t, t, s); `s` is required.

        `prediction="v"`: the UNet's output is read as v = √ᾱ ε − √(1−ᾱ) x0 (Salimans & Ho 2022)
        and returned as ε̂ = √ᾱ v̂ + √(1−ᾱ) x_t (fp32), so every sampler and analysis still sees ε.
        At high noise ε̂ is then mostly x_t itself and the UNet's output is the image's x̂0, the part
        that decides the digit; an ε-output must instead copy x_t through to the last decimal."""
        out = self.denoiser(x_t, t, s=s)
        if self.config.prediction == "epsilon":
            return out
        a = self.alphas_cumprod.to(x_t.device)[t.expand(len(x_t)) if t.ndim == 0 else t].view(-1, 1, 1, 1)
        return a.sqrt() * out.float() + (1 - a).sqrt() * x_t.float()
