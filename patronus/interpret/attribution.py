"""Which pixels of x_t make prototype J matter at timestep t, and how faithful that map is.

Adapted from Park et al. (2024, attribution for diffusion denoisers): pick a timestep t and a
prototype J and score the noisy input by how much J changes the denoiser's output,

    f(x_t) = ½ ‖ε̂(x_t | s) − ε̂(x_t | s_J = b_J)‖²   (image-level; §A's integrand at t).

A saliency map is |∂f/∂x_t| summed over channels, averaged over ε draws of the forward
process (SmoothGrad with the diffusion's own noise). Faithfulness is checked the usual way:
delete pixels of x_t most-important-first and watch f fall (deletion AUC, lower = better),
or insert them into a fully-deleted x_t and watch f rise (insertion AUC, higher = better),
always against a random-order map on the same x_t.

Unlike a classifier's logit, f does not vanish when the image is gone: the condition moves
ε̂ for a fully deleted x_t too (a "floor" of the curves), and deleting pixels can *raise* f.
|∂f/∂x_t| ranks pixels by how much they change f in either direction, so it is not a deletion
ranking, and it can be *less* faithful than the random map on both curves. The signed
gradient × input Σ_c x_t ∂f/∂x_t is the first-order estimate of f(x_t) −
E f(x_t with that pixel deleted) (the replacement has mean 0 for both references), i.e. the
ranking deletion asks for; on the tiny test model it beats the random map on insertion, not
reliably on deletion (docs/benchmarks.md has the numbers). `gradient_maps` returns both; the CLI scores both against random.

"Deleting" a pixel replaces its signal by fresh noise at t's noise level, √(1−ᾱ_t)·ε'
(x0 set to 0 there, the noise kept): the pixel still looks like a pixel of x_t to the
denoiser but carries no information about the image. `reference="zero"` sets it to 0
instead, which at low t is far from anything the denoiser was trained on.
"""

from __future__ import annotations

from typing import Optional

import torch
from einops import rearrange, reduce, repeat

from patronus.edits import set_prototypes
from patronus.interpret.information import noise_draws, noisy
from patronus.pipeline import PatronusPipeline


def _check(pipe: PatronusPipeline, prototype: int, t: int, num_noise: Optional[int] = None) -> None:
    """ValueError naming the argument that is out of range."""
    K, T = pipe.num_prototypes, pipe.model.config.num_train_timesteps
    if not 0 <= prototype < K:
        raise ValueError(f"prototype {prototype}: the model has K={K} prototypes (0..{K - 1})")
    if not 0 <= int(t) < T:
        raise ValueError(f"timestep {t}: the model has T={T} timesteps (0..{T - 1})")
    if num_noise is not None and num_noise < 1:
        raise ValueError(f"num_noise={num_noise}; expected at least 1 x_t draw")


def score(pipe: PatronusPipeline, x_t: torch.Tensor, t: int, s: torch.Tensor, s_alt: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """f(x_t) = ½‖ε̂(x_t|s) − ε̂(x_t|s_alt)‖² per row (M,); both conditions in one forward batch.

    The denoiser runs in eval mode without autocast; unlike the pipeline's verbs, f keeps the
    caller's gradient mode, so under `torch.enable_grad()` it is differentiable in x_t.
    """
    grad = torch.is_grad_enabled()
    x_t, s, s_alt = x_t.to(pipe.device), s.to(pipe.device), s_alt.to(pipe.device)
    out = []
    with pipe.inference(), torch.set_grad_enabled(grad):
        for i in range(0, len(x_t), chunk_size):
            x, c = x_t[i : i + chunk_size], torch.cat([s[i : i + chunk_size], s_alt[i : i + chunk_size]])
            eps = pipe.model(torch.cat([x, x]), torch.full((2 * len(x),), int(t), device=x.device), s=c).float()
            ref, alt = eps.chunk(2)
            out.append(0.5 * reduce((ref - alt).pow(2), "m c h w -> m", "sum"))
    return torch.cat(out)


def _conditions(
    pipe: PatronusPipeline, x0: torch.Tensor, prototype: int, baseline_value: float, s: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, s with s_J := baseline_value), both detached, on x0's device."""
    s = pipe.encode(x0).s if s is None else s.detach().to(x0.device)
    return s, set_prototypes(s, [prototype], baseline_value)


def gradient_maps(
    pipe: PatronusPipeline,
    x0: torch.Tensor,
    prototype: int,
    t: int,
    baseline_value: float,
    num_noise: int = 4,
    seed: int = 0,
    s: Optional[torch.Tensor] = None,
) -> dict[str, torch.Tensor]:
    """Per-pixel maps (B, H, W) from ∂f/∂x_t, mean over `num_noise` x_t draws (one backward each).

    "saliency" Σ_c |∂f/∂x_t| (≥ 0), "abs_gradient_x_input" |Σ_c x_t ∂f/∂x_t| (≥ 0) and
    "gradient_x_input" Σ_c x_t ∂f/∂x_t, signed: the first-order drop of f when the pixel is
    deleted (see the module docstring), so positive = deleting it lowers f. The ε of draw n is
    the one `information_map_at` and `faithfulness` use for the same seed (and num_noise).
    """
    _check(pipe, prototype, t, num_noise)
    x0 = x0.to(pipe.device)
    s, alt = _conditions(pipe, x0, prototype, baseline_value, s)
    sums = {
        k: x0.new_zeros(x0.shape[0], *x0.shape[-2:], dtype=torch.float32) for k in ("saliency", "abs_gradient_x_input", "gradient_x_input")
    }
    with pipe.inference():
        for eps in noise_draws(x0, num_noise, torch.Generator().manual_seed(seed)):
            x_t = noisy(pipe.model, x0, eps, t).detach().requires_grad_(True)
            with torch.enable_grad():  # the gradient of f in x_t, inside the pipeline's no_grad
                (grad,) = torch.autograd.grad(score(pipe, x_t, t, s, alt).sum(), x_t)  # f of image b depends on x_t[b] only
            gxi = (grad * x_t.detach()).sum(1)
            sums["saliency"] += grad.abs().sum(1)
            sums["abs_gradient_x_input"] += gxi.abs()
            sums["gradient_x_input"] += gxi
    return {k: v / num_noise for k, v in sums.items()}


def saliency_map(
    pipe: PatronusPipeline,
    x0: torch.Tensor,
    prototype: int,
    t: int,
    baseline_value: float,
    num_noise: int = 4,
    seed: int = 0,
    s: Optional[torch.Tensor] = None,
    times_input: bool = False,
) -> torch.Tensor:
    """|∂f/∂x_t| summed over channels, mean over `num_noise` x_t draws (B, H, W), ≥ 0.

    `times_input=True` gives gradient × input, |Σ_c x_t ∂f/∂x_t|. The ε of draw n is the one
    `information_map_at` and `faithfulness` use for the same seed (and num_noise).
    """
    maps = gradient_maps(pipe, x0, prototype, t, baseline_value, num_noise, seed, s)
    return maps["abs_gradient_x_input" if times_input else "saliency"]


def random_map(like: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A map of i.i.d. uniform scores shaped like `like` (B, H, W): the chance-level ordering."""
    return torch.rand(like.shape, generator=torch.Generator().manual_seed(seed)).to(like.device)


def _ranks(maps: torch.Tensor) -> torch.Tensor:
    """Rank of each pixel in its map, 0 = most important (B, H·W); ties keep pixel order."""
    order = torch.argsort(rearrange(maps, "b h w -> b (h w)"), dim=1, descending=True, stable=True)
    return torch.argsort(order, dim=1)


def faithfulness(
    pipe: PatronusPipeline,
    x0: torch.Tensor,
    prototype: int,
    t: int,
    baseline_value: float,
    maps: torch.Tensor,
    fractions: int = 20,
    seed: int = 0,
    num_noise: int = 1,
    reference: str = "noise",
    s: Optional[torch.Tensor] = None,
) -> dict[str, torch.Tensor]:
    """Deletion / insertion curves of f over pixel fractions 0, 1/F, …, 1 and their AUCs.

    Curves are f(x_t with a fraction of pixels deleted (or inserted), most important first) /
    f(x_t). The two end points are shared: deletion at 0 and insertion at 1 are x_t itself (both
    exactly 1), deletion at 1 and insertion at 0 the fully replaced x_t ("floor", which need not
    be near 0: see the module docstring). Curves are averaged over `num_noise` x_t
    draws (the first draws of `saliency_map` with the same seed); the replacement noise comes
    from the same generator, so every map scored with one seed sees the same x_t and the same
    replacement. Returns deletion_auc, insertion_auc, floor (B,), the curves (B, F+1),
    fractions (F+1,) and score f(x_t) (B,).
    """
    if fractions < 1:
        raise ValueError(f"fractions={fractions}: need at least 1 step")
    if reference not in ("noise", "zero"):
        raise ValueError(f"reference={reference!r}: expected 'noise' or 'zero'")
    _check(pipe, prototype, t, num_noise)
    x0 = x0.to(pipe.device)
    if maps.shape != (x0.shape[0], *x0.shape[-2:]):
        raise ValueError(f"maps has shape {tuple(maps.shape)}; expected (B, H, W) = {(x0.shape[0], *x0.shape[-2:])}")
    s, alt = _conditions(pipe, x0, prototype, baseline_value, s)
    B, _, H, W = x0.shape
    fracs = torch.linspace(0, 1, fractions + 1)
    counts = (fracs[1:-1] * H * W).round().long().to(x0.device)  # pixels changed at each interior step
    mask = _ranks(maps.to(x0.device))[None] < counts[:, None, None]  # (F−1, B, H·W)
    mask = rearrange(mask, "f b (h w) -> f b 1 h w", h=H)
    gen = torch.Generator().manual_seed(seed)
    noise = noise_draws(x0, num_noise, gen)
    fresh = noise_draws(x0, num_noise, gen)
    sigma = pipe.model.noise_scheduler().alphas_cumprod[int(t)].mul(-1).add(1).sqrt().item()
    deletion, insertion, base = 0.0, 0.0, 0.0
    with pipe.inference():
        for eps, eps_new in zip(noise, fresh):
            x_t = noisy(pipe.model, x0, eps, t)  # (B, C, H, W)
            ref = sigma * eps_new if reference == "noise" else torch.zeros_like(x_t)
            deleted = torch.where(mask, ref, x_t)  # (F−1, B, C, H, W)
            inserted = torch.where(mask, x_t, ref)
            batch = rearrange(torch.cat([x_t[None], ref[None], deleted, inserted]), "f b c h w -> (f b) c h w")
            n = len(batch) // B
            f = rearrange(score(pipe, batch, t, repeat(s, "b k -> (f b) k", f=n), repeat(alt, "b k -> (f b) k", f=n)), "(f b) -> b f", b=B)
            f0, f_ref, f_del, f_ins = f[:, :1], f[:, 1:2], f[:, 2 : fractions + 1], f[:, fractions + 1 :]
            deletion = deletion + torch.cat([f0, f_del, f_ref], 1) / f0.clamp_min(1e-12)  # (B, F+1)
            insertion = insertion + torch.cat([f_ref, f_ins, f0], 1) / f0.clamp_min(1e-12)
            base = base + f0[:, 0]
    deletion, insertion = deletion / num_noise, insertion / num_noise  # (B, F+1)
    return {
        "deletion_auc": torch.trapezoid(deletion, fracs.to(deletion), dim=1),
        "insertion_auc": torch.trapezoid(insertion, fracs.to(insertion), dim=1),
        "floor": deletion[:, -1],
        "deletion_curve": deletion,
        "insertion_curve": insertion,
        "fractions": fracs,
        "score": base / num_noise,
    }
