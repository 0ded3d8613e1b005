"""PatronusModule: the Lightning system around a PatronusModel (steps, optimiser, logging)."""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

import lightning.pytorch as pl
import torch

from patronus.diffusion import diffusion_loss, distinct_loss, reconstruction_loss
from patronus.models.patronus import PatronusModel
from patronus.training.checkpointing import check_finite_loss


def _init_weights(init_from: str, net: PatronusModel) -> dict[str, torch.Tensor]:
    """The weights of `init_from` for `net`; every error names the option (not a sampling command's --checkpoint)."""
    from patronus.runs import load_model

    try:
        source = load_model(init_from)
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"model.init_from={init_from}: {str(e.args[0]) if e.args else e}") from None
    ours, theirs = dict(net.config), dict(source.config)
    diff = [
        f"{k}: {theirs[k]!r} there, {ours[k]!r} here"
        for k in sorted(ours)
        if not k.startswith("_") and k in theirs and list(np_tuple(theirs[k])) != list(np_tuple(ours[k]))
    ]
    if diff:
        raise ValueError(
            f"model.init_from={init_from}: a different architecture than model.net ({'; '.join(diff)}); "
            "fine-tuning needs the same model.net settings"
        )
    return source.state_dict()


def np_tuple(v: Any) -> tuple:
    """Config values compared as tuples (lists and tuples alike)."""
    return tuple(v) if isinstance(v, (list, tuple)) else (v,)


class PatronusModule(pl.LightningModule):
    """Trains ε_θ and the prototype encoder jointly: loss = noise MSE + λ·L_distinct (Patronus Eq. 4)
    (+ μ·reconstruction, optional).

    Args:
        net: the model; its constructor arguments are the model config.
        lr: AdamW learning rate (paper 1e-5; the CPU presets use a much larger one with warmup).
        weight_decay: AdamW weight decay; 0 = none.
        warmup_steps: linear learning-rate warmup over this many steps; 0 = none.
        lr_schedule: after warmup, "constant" or "cosine" decay to 10% at trainer.max_steps
            (short runs gain most from ending at a low learning rate); "constant" = no decay.
        distinct_weight: λ for the prototype-distinctness loss; 0 = no distinctness loss.
        distinct_margin: δ, minimum wanted dissimilarity 1−|cos| between any two prototypes.
        snr_gamma: Min-SNR-γ loss weighting; None = the paper's plain MSE.
        held_prototypes: {prototype: value} held constant in the denoiser's condition (fine-tuning
            away a shortcut the report flagged; `python -m patronus shortcuts` writes this config); None = none.
        init_from: start from the weights of a run / exported model / .ckpt (fine-tuning);
            loaded safely (safetensors or weights_only), the architecture must match; None = random init.
        reconstruction_weight: μ of the reconstruction loss: a decoder redraws the image from the
            encoder's feature map (`patronus.diffusion.reconstruction_loss`), so features keep small
            patterns the prototypes do not match yet and reseeding can find them; 0 = the paper's objective.
        compile: wrap the denoiser's UNet with `torch.compile` (in place, so checkpoints keep their
            keys) once training starts; False = eager. Whether it pays: benchmarks/gpu_check.py.
    """

    def __init__(
        self,
        net: PatronusModel,
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        distinct_weight: float = 0.1,
        distinct_margin: float = 0.3,
        snr_gamma: Optional[float] = None,
        held_prototypes: Optional[dict[int, float]] = None,
        init_from: Optional[str] = None,
        reconstruction_weight: float = 0.0,
        compile: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        bad = [j for j in (held_prototypes or {}) if not 0 <= int(j) < net.config.num_prototypes]
        if bad:
            raise ValueError(f"held_prototypes {bad}: the model has K={net.config.num_prototypes} prototypes")
        if not reconstruction_weight >= 0:
            raise ValueError(f"model.reconstruction_weight={reconstruction_weight!r}; expected a number >= 0")
        self.held = {int(j): float(v) for j, v in (held_prototypes or {}).items()}
        if init_from is not None:
            net.load_state_dict(_init_weights(init_from, net))
        self.net = net
        self.scheduler = net.noise_scheduler()
        # Training only: the decoder is saved in Lightning checkpoints (resume), not in the exported model.
        self.feature_decoder = net.encoder.feature_decoder() if reconstruction_weight > 0 else None
        self.distinct_exempt: list[int] = []  # set by PrototypeReseeding: prototypes copied from real patches

    def setup(self, stage: str) -> None:
        """Check one training image against the model before any step: a channel or size mismatch
        otherwise surfaces as a convolution error deep inside the first batch."""
        data = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        images = getattr(data, "train_set", None) if stage == "fit" else None
        if not images:
            return
        got, c = tuple(images[0]["image"].shape), self.net.config
        want = (c.in_channels, c.image_size, c.image_size)
        if got != want:
            name = getattr(data, "hparams", {}).get("dataset", "?")
            raise ValueError(
                f"data.dataset={name!r} gives {got[0]}-channel {got[2]}x{got[1]} images, but the model expects "
                f"model.net.in_channels={c.in_channels} and model.net.image_size={c.image_size}; set "
                f"model.net.in_channels={got[0]} (data.channels and data.image_size follow the model)"
            )

    def on_fit_start(self) -> None:
        # After setup (EMA has deep-copied the eager module) and after the move to the device / DDP wrap.
        if self.hparams.compile:
            self.net.denoiser.unet.compile()

    def _loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x0, enc = batch["image"], self.net.encoder
        z = enc.features(x0) if self.feature_decoder is not None else None  # one encoder pass for both losses
        s = enc.encode_features(z) if z is not None else None
        mse, s = diffusion_loss(self.net, self.scheduler, x0, self.hparams.snr_gamma, self.held, s=s)
        dist = distinct_loss(enc.prototypes, self.hparams.distinct_margin, self.distinct_exempt)
        out = {"loss": mse + self.hparams.distinct_weight * dist, "mse": mse, "distinct": dist, "s_mean": s.mean()}
        if z is not None:
            out["reconstruction"] = reconstruction_loss(self.feature_decoder, z, x0)
            out["loss"] = out["loss"] + self.hparams.reconstruction_weight * out["reconstruction"]
        return out

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self._loss(batch)
        check_finite_loss(self, out["loss"])  # before backward: a NaN step never reaches the weights
        # sync_dist: one all-reduce of a few scalars per step, so every rank logs the global mean.
        self.log("train/loss", out["loss"], prog_bar=True, sync_dist=True)
        self.log_dict({f"train/{k}": v for k, v in out.items() if k != "loss"}, sync_dist=True)
        return out["loss"]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # Same t and ε for the same batch at every validation, so curves compare like with like.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(batch_idx)
            out = self._loss(batch)
        self.log("val/loss", out["loss"], prog_bar=True, sync_dist=True)
        self.log("val/mse", out["mse"], sync_dist=True)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        warm = max(self.hparams.warmup_steps, 1)
        total = max(int(self.trainer.estimated_stepping_batches), warm + 1)
        cosine = self.hparams.lr_schedule == "cosine"

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            if not cosine:
                return 1.0
            progress = min((step - warm) / (total - warm), 1.0)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Plain types only, so the checkpoint loads with torch.load(weights_only=True).
        checkpoint["net_config"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.net.config.items()}
