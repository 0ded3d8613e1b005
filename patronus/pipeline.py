"""PatronusPipeline: the one object for inference — encode, sample, invert, reconstruct, edit, generate.

A diffusers `DiffusionPipeline` (components: the Patronus model, its scheduler and, when trained,
the activation prior), so `save_pretrained` / `from_pretrained` / `.to(device)` / progress bars
work as for any diffusers pipeline; `from_pretrained` also takes a training run directory, an
exported model directory or a Lightning `.ckpt` (loaded safely, never unpickled).

The registered scheduler is the one every verb uses: each call derives the DDIM, DDPM or inverse
DDIM scheduler it needs from that scheduler's config (`patronus.schedulers.scheduler_for`), so a
scheduler passed in or assigned (`pipe.scheduler = ...`) keeps all of its settings.

Every verb runs in eval mode, without gradients and without autocast (the prototype distances
‖z‖² − 2z·p + ‖p‖² cancel badly in bf16), and restores the model's train/eval state afterwards,
so the training callbacks can call it on the live or EMA network. Noise is drawn on the CPU from
a seed, so a seed means the same x_T on every device. The steps run through the one denoising
loop, `patronus.sampling.denoise_loop`.

Step counts: `steps` is the number of steps of the schedule a verb runs; an edit from partial
noise inverts only the first `inverted_steps` of them (from the clean image upwards) and decodes
those again, so `inverted_steps = steps` (the default) is a full inversion to x_T.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
from diffusers import DiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from patronus import runs
from patronus.edits import Edit, apply_edits, check_coupling, couple
from patronus.models.patronus import PatronusModel
from patronus.models.prior import ActivationPrior
from patronus.models.prototypes import Activations
from patronus.sampling import EpsFn, StepCallback, denoise_loop
from patronus.schedulers import default_ddim, scheduler_for
from patronus.torch_utils import eval_mode

__all__ = ["Activations", "Coupling", "EditResult", "Inversion", "PatronusPipeline", "Sampler"]

Sampler = Literal["ddim", "ddpm"]
# How `edit` inverts: "ddim" pins the image into x_T (deterministic, Song et al. 2021);
# "edit_friendly" keeps one noise map per step (Huberman-Spiegelglas et al., CVPR 2024).
Inversion = Literal["ddim", "edit_friendly"]
# What else an edit moves: "alone" = only the named prototypes (every other one bit-for-bit);
# "correlated" = the others follow them along the data's linear regression (`follow_correlations`);
# "neighbours" = the others are those of the real images nearest the edit (`follow_neighbours`).
Coupling = Literal["alone", "correlated", "neighbours"]


@dataclass
class EditResult:
    """Images edited from the same latent: the inverted x_t, the plain decode and one decode per edit."""

    latent: torch.Tensor  # (B, C, H, W) x_t after inverting `inverted_steps` of the `steps` steps
    s: torch.Tensor  # (B, K) the images' own activations
    reconstruction: torch.Tensor  # (B, C, H, W) decode of the latent under s
    images: torch.Tensor  # (E, B, C, H, W) decode of the same latent under each edited s
    requested: torch.Tensor  # (E, B, K) the edited activations
    inverted_steps: int  # how many steps the latent was inverted (= steps for a full inversion to x_T)
    corrections: Optional[torch.Tensor] = None  # (steps, B, C, H, W) noise maps of an edit-friendly inversion


def _inverted(steps: int, inverted_steps: Optional[int]) -> int:
    """How many of `steps` steps an inversion runs (and a decode of its latent runs again); None = all."""
    k = steps if inverted_steps is None else inverted_steps
    if not 0 <= k <= steps:
        raise ValueError(f"inverted_steps={inverted_steps}; expected 0..steps={steps}")
    return k


class PatronusPipeline(DiffusionPipeline):
    """Inference for a Patronus model (see the module docstring).

    Args:
        model: the prototype encoder + conditioned denoiser.
        scheduler: the scheduler whose config every verb derives its schedulers from (default: DDIM
            with trailing spacing on the model's training schedule, `patronus.schedulers.default_ddim`).
        prior: the diffusion prior over activations, for `generate` (optional).
    """

    _optional_components = ["scheduler", "prior"]
    model_cpu_offload_seq = "model"

    def __init__(self, model: PatronusModel, scheduler: Optional[SchedulerMixin] = None, prior: Optional[ActivationPrior] = None):
        super().__init__()
        if scheduler is None:
            scheduler = default_ddim(model.noise_scheduler().config)
        self.register_modules(model=model, scheduler=scheduler, prior=prior)
        self.set_progress_bar_config(disable=True, leave=False)  # the CLI turns bars on
        # Defaults for every call that does not pass its own (the CLI's --edit_guidance), so each
        # analysis that edits honours them: edit guidance of `edit` and of `decode_edited`. 1.0 = no guidance.
        self.edit_guidance = 1.0
        self.inversion: Inversion = "ddim"  # how `edit` inverts (the CLI's --inversion)
        self.coupling: Coupling = "alone"  # what else `edit` moves (the CLI's --coupling)

    # --- loading -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path, device: Optional[str | torch.device] = None, **kwargs) -> PatronusPipeline:
        """Load from a saved pipeline (`save_pretrained`), a training run directory, an exported
        model directory or a Lightning `.ckpt`. A run's trained activation prior comes along."""
        p = Path(path)
        if (p / runs.PIPELINE_INDEX).is_file():
            pipe = super().from_pretrained(p, use_safetensors=True, low_cpu_mem_usage=False, **kwargs)
        else:
            model = runs.load_model(p)
            prior = runs.load_prior(p, model) if (runs.prior_dir(p) / ActivationPrior.config_name).is_file() else None
            pipe = cls(model=model, prior=prior)
        return pipe.to(device) if device is not None else pipe

    # --- small shared pieces ----------------------------------------------------------------

    @contextmanager
    def inference(self) -> Iterator[None]:
        """Eval mode (BatchNorm must not update), no gradients, no autocast; the train flags are restored."""
        with eval_mode(self.model, self.prior), torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            yield

    @property
    def num_prototypes(self) -> int:
        return self.model.config.num_prototypes

    def image_shape(self) -> tuple[int, int, int]:
        c = self.model.config
        return (c.in_channels, c.image_size, c.image_size)

    def noise(self, shape: Sequence[int], seed: Optional[int] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Standard normal noise drawn on the CPU (from `generator`, else from `seed`), then moved to
        the pipeline's device: the same seed gives the same x_T everywhere."""
        gen = generator if generator is not None else torch.Generator().manual_seed(0 if seed is None else seed)
        return torch.randn(tuple(shape), generator=gen).to(self.device)

    def _eps(self, s: torch.Tensor, guidance: float = 1.0, guide_from: Optional[torch.Tensor] = None) -> EpsFn:
        """ε̂(x_t, t, s), or with edit guidance w ≠ 1: ε̂(base) + w·(ε̂(s) − ε̂(base)) in one batched
        call, base = `guide_from`, the unedited s: w scales the edit's effect and needs no retraining.
        """
        if guidance == 1.0:
            return lambda x, t: self.model(x, t.expand(len(x)).to(x.device), s=s)
        if guide_from is None:
            raise ValueError(f"guidance={guidance}: edit guidance needs the unedited s to guide from (guide_from)")
        B, conds = len(s), torch.cat([s, guide_from.to(s)])

        def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            cond, base = self.model(torch.cat([x, x]), t.expand(2 * B).to(x.device), s=conds).chunk(2)
            return base + guidance * (cond - base)

        return eps

    # --- the verbs -------------------------------------------------------------------------

    def encode(self, images: torch.Tensor, batch_size: int = 256) -> Activations:
        """`PrototypeEncoder.activations` of clean images in [-1, 1], in batches; results on the images' device."""
        parts = []
        with self.inference():
            for i in range(0, len(images), batch_size):
                a = self.model.encoder.activations(images[i : i + batch_size].to(self.device))
                parts.append(Activations(a.s.to(images.device), a.where.to(images.device), a.distances.to(images.device)))
        if not parts:
            empty = images.new_zeros(0, self.num_prototypes)
            return Activations(empty, empty.long(), empty)
        return Activations(torch.cat([a.s for a in parts]), torch.cat([a.where for a in parts]), torch.cat([a.distances for a in parts]))

    def denoise(
        self,
        x: torch.Tensor,
        s: torch.Tensor,
        steps: int = 50,
        *,
        inverted_steps: Optional[int] = None,  # x is the latent of inverting this many of the steps; None = x_T
        sampler: Sampler = "ddim",
        clip: bool = True,  # clip x̂0 as the scheduler's config says; False = never (exact inversion)
        generator: Optional[torch.Generator] = None,  # DDPM's per-step noise; None = torch's global RNG
        callback: Optional[StepCallback] = None,
        guidance: float = 1.0,  # edit guidance w; 1 = none
        guide_from: Optional[torch.Tensor] = None,  # edit guidance's base s (needed when guidance ≠ 1)
        corrections: Optional[torch.Tensor] = None,  # noise maps of `invert_edit_friendly`; None = plain decoding
    ) -> torch.Tensor:
        """Decode x under condition s: all `steps` steps from x_T, or the last `inverted_steps` of them
        from the latent an inversion of that many steps left.

        DDIM (deterministic) or ancestral DDPM. `clip=False` keeps x̂0 unclipped, which exact
        inversion and reconstruction need. `guidance` w ≠ 1 guides from `guide_from` towards s
        (edit guidance).
        `corrections`: the noise maps of `invert_edit_friendly`; each step is then the DDPM
        posterior mean (DDIM with eta = 1, no fresh noise) plus that step's map.
        """
        x, s = x.to(self.device), s.to(self.device)
        sched = scheduler_for(self.scheduler.config, sampler, steps, clip)
        if corrections is not None:
            if sampler != "ddim" or len(corrections) != steps:
                raise ValueError(
                    f"corrections: expected {steps} noise maps for a DDIM-scheduled decode, got {len(corrections)} with sampler={sampler!r}"
                )
            kwargs = {"eta": 1.0, "variance_noise": torch.zeros_like(x)}
        else:
            kwargs = {"generator": generator}
        with self.inference():
            eps = self._eps(s, guidance, guide_from)
            last = range(steps - _inverted(steps, inverted_steps), steps)  # decoding ends at the clean image
            return denoise_loop(sched, x, eps, last, callback, self.progress_bar, corrections=corrections, **kwargs)

    def sample(
        self,
        s: torch.Tensor,
        x_T: Optional[torch.Tensor] = None,
        *,
        seed: int = 0,
        generator: Optional[torch.Generator] = None,
        steps: int = 50,
        sampler: Sampler = "ddim",
        callback: Optional[StepCallback] = None,
    ) -> torch.Tensor:
        """New images (B, C, H, W) with activations s from x_T (drawn from `seed`/`generator` if not given)."""
        if x_T is None:
            gen = generator if generator is not None else torch.Generator().manual_seed(seed)
            x_T = self.noise((len(s), *self.image_shape()), generator=gen)
            generator = gen  # DDPM's per-step noise continues the same stream
        return self.denoise(x_T, s, steps, sampler=sampler, generator=generator, callback=callback)

    def invert(
        self,
        x0: torch.Tensor,
        s: Optional[torch.Tensor] = None,
        steps: int = 50,
        inverted_steps: Optional[int] = None,
        fixed_point: int = 0,
    ) -> torch.Tensor:
        """Deterministic DDIM inversion x0 → x_T under s (default: x0's own), without clipping.

        `inverted_steps` k < steps inverts only the first k steps: the x_t that
        `denoise(x_t, s, steps, inverted_steps=k)` decodes again (partial-noise editing).
        `fixed_point` k solves each implicit inversion step with k extra denoiser calls (see
        `patronus.sampling.denoise_loop`): reconstructions as exact as plain inversion's with far fewer steps.
        """
        x0 = x0.to(self.device)
        s = self.encode(x0).s if s is None else s.to(self.device)
        sched = scheduler_for(self.scheduler.config, "inverse", steps, clip=False)
        first = range(_inverted(steps, inverted_steps))  # inversion starts at the clean image
        with self.inference():
            return denoise_loop(sched, x0, self._eps(s), first, progress=self.progress_bar, fixed_point=fixed_point)

    def invert_edit_friendly(
        self, x0: torch.Tensor, s: Optional[torch.Tensor] = None, steps: int = 50, seed: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Edit-friendly DDPM inversion (Huberman-Spiegelglas et al., CVPR 2024, Alg. 1): (x_T, noise maps).

        Every x_{t_i} of the decoding schedule is drawn *independently* from q(x_t | x0) =
        N(√ᾱ_t x0, (1−ᾱ_t) I) (their Eq. 6), and each step's map is what the DDPM posterior mean
        misses, c_i = x_{t_{i+1}} − μ(x_{t_i}, t_i, s) (their Eq. 5, σ_t z_t absorbed into c_i;
        the last step's target is x0 itself). `denoise(x_T, s, steps, corrections=c)` reproduces
        x0 exactly; the same maps under an edited s leave every step's mean free to follow the
        edit, where DDIM inversion pins the image into one x_T that a changed s can barely move.
        """
        x0 = x0.to(self.device)
        s = self.encode(x0).s if s is None else s.to(self.device)
        sched = scheduler_for(self.scheduler.config, "ddim", steps, clip=False)
        gen = torch.Generator().manual_seed(seed)
        alpha_bar = sched.alphas_cumprod.to(self.device)
        x_ts = [
            alpha_bar[t].sqrt() * x0 + (1 - alpha_bar[t]).sqrt() * self.noise(x0.shape, generator=gen) for t in sched.timesteps.tolist()
        ]
        targets = x_ts[1:] + [x0]
        eps, zeros = self._eps(s), torch.zeros_like(x0)
        with self.inference():
            means = [sched.step(eps(x, t), t, x, eta=1.0, variance_noise=zeros).prev_sample for x, t in zip(x_ts, sched.timesteps)]
        return x_ts[0], torch.stack([y - m for y, m in zip(targets, means)])

    def reconstruct(self, x0: torch.Tensor, steps: int = 50, fixed_point: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Invert x0 under its own s and decode again: (x_T, reconstruction)."""
        s = self.encode(x0.to(self.device)).s
        x_T = self.invert(x0, s, steps, fixed_point=fixed_point)
        return x_T, self.denoise(x_T, s, steps, clip=False)

    def edit(
        self,
        x0: torch.Tensor,
        edits: Sequence[Sequence[Edit]],
        steps: int = 50,
        inverted_steps: Optional[int] = None,  # invert only this many of the steps (partial noise); None = all
        levels: Optional[dict[str, torch.Tensor]] = None,  # named edit values ("q99", "sd", ...); None = numbers only
        guidance: Optional[float] = None,  # edit guidance w; None = self.edit_guidance
        fixed_point: int = 0,  # extra denoiser calls per inversion step; 0 = plain DDIM inversion
        inversion: Optional[Inversion] = None,  # None = self.inversion
        seed: int = 0,  # the noise of an edit-friendly inversion
        coupling: Optional[Coupling] = None,  # None = self.coupling; "correlated" / "neighbours" need levels
    ) -> EditResult:
        """Invert x0 (fully, or only `inverted_steps` of the `steps` steps), then decode the same
        latent under s and under each edited s. `levels` resolves named edit values ('q99', ...).

        `guidance` w > 1 is edit guidance, ε̂(s) + w·(ε̂(s_edit) − ε̂(s)): the edit's effect on the
        prediction is amplified w times, with no retraining (w = 1: plain decoding under s_edit).
        `inversion`: "ddim" (`invert`; `fixed_point` k solves each step exactly, for faithful
        reconstructions in few steps) or "edit_friendly" (`invert_edit_friendly`, its noise drawn
        from `seed`; exact reconstruction, and the edit is free to change every step; no
        `inverted_steps` or `fixed_point`).
        `coupling`: "alone" changes only the prototypes each edit names; "correlated" also moves
        the others by their regression on those over real data (`follow_correlations`, with
        `levels["cov"]`); "neighbours" sets the others to those of the real images nearest the
        edit (`follow_neighbours`, with `levels["activations"]`); both from
        `patronus.interpret.stats.edit_levels`. A coupled edit asks for an s like a real image's,
        which the decode follows further. `EditResult.requested` holds the s each decode was given."""
        inversion = self.inversion if inversion is None else inversion
        coupling = self.coupling if coupling is None else coupling
        check_coupling(coupling, levels)  # before the inversion's work
        if inversion not in ("ddim", "edit_friendly"):
            raise ValueError(f"inversion={inversion!r}; expected 'ddim' or 'edit_friendly'")
        k = steps if inverted_steps is None else inverted_steps
        if not 0 < k <= steps:
            raise ValueError(f"inverted_steps={inverted_steps}; expected 1..steps={steps}")
        if inversion == "edit_friendly" and (k != steps or fixed_point):
            raise ValueError("inversion='edit_friendly' inverts every step exactly: leave inverted_steps and fixed_point unset")
        x0 = x0.to(self.device)
        s = self.encode(x0).s
        corrections = None
        if inversion == "edit_friendly":
            latent, corrections = self.invert_edit_friendly(x0, s, steps, seed)
        else:
            latent = self.invert(x0, s, steps, inverted_steps=k, fixed_point=fixed_point)
        recon = self.denoise(latent, s, steps, inverted_steps=k, clip=False, corrections=corrections)
        requested = [couple(s, apply_edits(s, list(e), levels), [x.prototype for x in e], coupling, levels) for e in edits]
        images = [self.decode_edited(latent, r, s, steps, inverted_steps=k, guidance=guidance, corrections=corrections) for r in requested]
        return EditResult(
            latent,
            s,
            recon,
            torch.stack(images) if images else recon.new_zeros(0, *recon.shape),
            torch.stack(requested) if requested else s.new_zeros(0, *s.shape),
            k,
            corrections,
        )

    def decode_edited(
        self,
        x: torch.Tensor,
        s_edit: torch.Tensor,
        s: torch.Tensor,
        steps: int = 50,
        *,
        inverted_steps: Optional[int] = None,
        guidance: Optional[float] = None,
        callback: Optional[StepCallback] = None,
        clip: bool = False,
        corrections: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Decode x (an inverted or fresh latent) under edited activations s_edit, with edit guidance
        ε̂(s) + w·(ε̂(s_edit) − ε̂(s)) relative to the unedited s (default w: `self.edit_guidance`).

        `clip=False` (default) suits an inverted latent, which must reproduce its image; pass
        `clip=True` for a fresh x_T, as `sample` does (unclipped x̂0 from noise can run out of range).
        `corrections`: the noise maps of an edit-friendly inversion of x."""
        w = self.edit_guidance if guidance is None else guidance
        return self.denoise(
            x, s_edit, steps, inverted_steps=inverted_steps, clip=clip, guidance=w, guide_from=s, callback=callback, corrections=corrections
        )

    def sample_activations(self, n: int, steps: int = 50, seed: int = 0) -> torch.Tensor:
        """n activation vectors (n, K) from the diffusion prior over standardised s (Patronus §3.4)."""
        if self.prior is None:
            raise ValueError("this pipeline has no activation prior; train one with `python -m patronus prior`")
        # The prior's own schedule (its T and ±6σ clipping), with the image scheduler's default DDIM settings.
        sched = scheduler_for(default_ddim(self.prior.scheduler().config).config, "ddim", steps)
        z = self.noise((n, self.prior.config.num_prototypes), seed=seed)
        with self.inference():
            z = denoise_loop(sched, z, lambda x, t: self.prior(x, t.to(x.device)), progress=self.progress_bar)
        return self.prior.to_activations(z)

    def generate(self, n: int, steps: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Unconditional images: activations from the prior, decoded by the image model → (images, s)."""
        s = self.sample_activations(n, steps, seed)
        return self.sample(s, seed=seed + 1, steps=steps), s
