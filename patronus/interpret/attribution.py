"""Which pixels of x_t make prototype J matter at timestep t, and how faithful that map is.

Adapted from Park et al. (2024, attribution for diffusion denoisers): pick a timestep t and a
prototype J and score the noisy input by how much J changes the denoiser's output,

    f(x_t) = ½ ‖ε̂(x_t | s) − ε̂(x_t | s_J = b_J)‖²   (image-level; §A's integrand at t).

A saliency map is |∂f/∂x_t| summed over channels, averaged over ε draws of the forward
process (SmoothGrad with the diffusion's own noise). Faithfulness is checked the usual way:
delete pixels of x_t most-important-first and watch f fall (deletion AUC, lower = better),
or insert them into a fully-deleted x_t and watch f rise (insertion AUC, higher = better),
always against a random-order map on the same x_t.

"Deleting" a pixel replaces its signal by fresh noise at t's noise level, √(1−ᾱ_t)·ε'
(x0 set to 0 there, the noise kept): the pixel still looks like a pixel of x_t to the
denoiser but carries no information about the image. `reference="zero"` sets it to 0
instead, which at low t is far from anything the denoiser was trained on.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # no display on servers/CI; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from einops import rearrange, reduce, repeat  # noqa: E402

from patronus.interpret.figures import render  # noqa: E402
from patronus.interpret.information import display_image, information_map_at, noise_draws, noisy, resolve_baseline
from patronus.models.patronus import PatronusModel


def score(model: PatronusModel, x_t: torch.Tensor, t: int, s: torch.Tensor, s_alt: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """f(x_t) = ½‖ε̂(x_t|s) − ε̂(x_t|s_alt)‖² per row (M,); both conditions in one forward batch."""
    out = []
    for i in range(0, len(x_t), chunk_size):
        x, c = x_t[i : i + chunk_size], torch.cat([s[i : i + chunk_size], s_alt[i : i + chunk_size]])
        eps = model(torch.cat([x, x]), torch.full((2 * len(x),), int(t), device=x.device), s=c).float()
        ref, alt = eps.chunk(2)
        out.append(0.5 * reduce((ref - alt).pow(2), "m c h w -> m", "sum"))
    return torch.cat(out)


def _conditions(model: PatronusModel, x0: torch.Tensor, prototype: int, baseline_value: float,
                s: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        s = model.encode(x0) if s is None else s.detach()
    alt = s.clone()
    alt[:, prototype] = baseline_value
    return s, alt


def saliency_map(
    model: PatronusModel,
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
    s, alt = _conditions(model, x0, prototype, baseline_value, s)
    total = x0.new_zeros(x0.shape[0], *x0.shape[-2:], dtype=torch.float32)
    for eps in noise_draws(x0, num_noise, torch.Generator().manual_seed(seed)):
        x_t = noisy(model, x0, eps, t).detach().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(score(model, x_t, t, s, alt).sum(), x_t)
        total += (grad * x_t.detach()).sum(1).abs() if times_input else grad.abs().sum(1)
    return total / num_noise


def random_map(like: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A map of i.i.d. uniform scores shaped like `like` (B, H, W): the chance-level ordering."""
    return torch.rand(like.shape, generator=torch.Generator().manual_seed(seed)).to(like.device)


def _ranks(maps: torch.Tensor) -> torch.Tensor:
    """Rank of each pixel in its map, 0 = most important (B, H·W); ties keep pixel order."""
    order = torch.argsort(rearrange(maps, "b h w -> b (h w)"), dim=1, descending=True, stable=True)
    return torch.argsort(order, dim=1)


@torch.no_grad()
def faithfulness(
    model: PatronusModel,
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
    f(x_t), so deletion starts at exactly 1 and insertion ends at exactly 1; deletion at 1 and
    insertion at 0 are both the fully replaced x_t. Curves are averaged over `num_noise` x_t
    draws (the first draws of `saliency_map` with the same seed); the replacement noise comes
    from the same generator, so every map scored with one seed sees the same x_t and the same
    replacement. Returns deletion_auc, insertion_auc (B,), the curves (B, F+1), fractions
    (F+1,) and score f(x_t) (B,).
    """
    if reference not in ("noise", "zero"):
        raise ValueError(f"reference={reference!r}: expected 'noise' or 'zero'")
    s, alt = _conditions(model, x0, prototype, baseline_value, s)
    B, _, H, W = x0.shape
    fracs = torch.linspace(0, 1, fractions + 1)
    counts = (fracs * H * W).round().long().to(x0.device)  # pixels changed at each step
    mask = _ranks(maps.to(x0.device))[None] < counts[:, None, None]  # (F+1, B, H·W)
    mask = rearrange(mask, "f b (h w) -> f b 1 h w", h=H)
    gen = torch.Generator().manual_seed(seed)
    noise = noise_draws(x0, num_noise, gen)
    fresh = noise_draws(x0, num_noise, gen)
    sigma = model.noise_scheduler().alphas_cumprod[int(t)].mul(-1).add(1).sqrt().item()
    deletion, insertion, base = 0.0, 0.0, 0.0
    for eps, eps_new in zip(noise, fresh):
        x_t = noisy(model, x0, eps, t)  # (B, C, H, W)
        ref = sigma * eps_new if reference == "noise" else torch.zeros_like(x_t)
        deleted = torch.where(mask, ref, x_t)  # (F+1, B, C, H, W)
        inserted = torch.where(mask, x_t, ref)
        batch = rearrange(torch.stack([deleted, inserted]), "d f b c h w -> (d f b) c h w")
        cond = repeat(s, "b k -> (d f b) k", d=2, f=fractions + 1)
        cond_alt = repeat(alt, "b k -> (d f b) k", d=2, f=fractions + 1)
        f = rearrange(score(model, batch, t, cond, cond_alt), "(d f b) -> d b f", d=2, b=B)
        f0 = f[0, :, :1]  # f(x_t): nothing deleted
        deletion = deletion + f[0] / f0.clamp_min(1e-12)
        insertion = insertion + f[1] / f0.clamp_min(1e-12)
        base = base + f0[:, 0]
    deletion, insertion = deletion / num_noise, insertion / num_noise  # (B, F+1)
    return {
        "deletion_auc": torch.trapezoid(deletion, fracs.to(deletion), dim=1),
        "insertion_auc": torch.trapezoid(insertion, fracs.to(insertion), dim=1),
        "deletion_curve": deletion,
        "insertion_curve": insertion,
        "fractions": fracs,
        "score": base / num_noise,
    }


def attribution_figure(images: torch.Tensor, x_t: torch.Tensor, saliency: torch.Tensor, information: torch.Tensor,
                       title: str = "", path: Optional[Path] = None, max_images: int = 8) -> torch.Tensor:
    """Per image a row: the image, x_t, the saliency map and the information map at t (uint8 (3, H, W))."""
    B = min(len(images), max_images)
    cols = [("image", None), ("x_t", None), ("|∂f/∂x_t|", saliency), ("½‖Δε̂‖² at t", information)]
    fig, axes = plt.subplots(B, len(cols), figsize=(1.5 * len(cols), 1.5 * B), squeeze=False)
    for b in range(B):
        axes[b, 0].imshow(display_image(images[b]), cmap="gray", vmin=0, vmax=1)
        xt = x_t[b].detach().float().cpu()
        axes[b, 1].imshow(xt[0] if xt.shape[0] == 1 else display_image(xt.clamp(-1, 1)), cmap="gray")
        for c, (_, m) in enumerate(cols[2:], start=2):
            axes[b, c].imshow(m[b].detach().float().cpu(), cmap="inferno", interpolation="nearest")
        for c, (name, _) in enumerate(cols):
            axes[b, c].set_xticks([])
            axes[b, c].set_yticks([])
            if b == 0:
                axes[b, c].set_title(name, fontsize=7)
    fig.suptitle(title, fontsize=8)
    return render(fig, path)


# --- CLI glue (wired into patronus.interpret.cli by the caller) ----------------------------


def add_attribution_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prototype", type=int, help="default: the prototype with the largest dataset std")
    parser.add_argument("--timestep", type=int, default=None, help="default: T/4")
    parser.add_argument("--baseline", choices=("zero", "median"), default="zero", help="value s_J is set to")
    parser.add_argument("--num-noise", type=int, default=4, help="x_t draws averaged by the saliency map")
    parser.add_argument("--fractions", type=int, default=20, help="deletion/insertion steps")


def _summary(result: dict[str, torch.Tensor]) -> dict:
    return {
        "deletion_auc_mean": float(result["deletion_auc"].mean()),
        "insertion_auc_mean": float(result["insertion_auc"].mean()),
        "deletion_auc": result["deletion_auc"].tolist(),
        "insertion_auc": result["insertion_auc"].tolist(),
    }


def run_attribution(args: argparse.Namespace, model: PatronusModel, refs: torch.Tensor, stats: dict, out: Path) -> dict:
    """Saliency and information maps at one (prototype, t), their faithfulness against a random map."""
    K, T = model.config.num_prototypes, model.config.num_train_timesteps
    j = args.prototype if args.prototype is not None else int(torch.tensor(stats["std"]).argmax())
    t = args.timestep if args.timestep is not None else T // 4
    if not 0 <= j < K or not 0 <= t < T:
        raise SystemExit(f"error: --prototype {j} / --timestep {t}: the model has K={K} prototypes and T={T} timesteps")
    seed = getattr(args, "seed", 0)
    value = float(resolve_baseline(args.baseline, K, stats)[j])
    s = model.encode(refs)
    maps = {
        "saliency": saliency_map(model, refs, j, t, value, args.num_noise, seed, s=s),
        "information": information_map_at(model, refs, j, t, value, args.num_noise, seed, s=s),
        "random": random_map(refs[:, 0], seed),
    }
    x_t = noisy(model, refs, noise_draws(refs, 1, torch.Generator().manual_seed(seed))[0], t)
    title = f"prototype {j}, t={t}, s_J → {args.baseline} ({value:.3g})"
    attribution_figure(refs, x_t, maps["saliency"], maps["information"], title, out / "attribution.png")
    scores = {k: faithfulness(model, refs, j, t, value, m, args.fractions, seed, s=s) for k, m in maps.items()}
    return {"prototype": j, "timestep": t, "baseline": args.baseline, "baseline_value": value,
            "score_f_xt": scores["saliency"]["score"].tolist(), **{k: _summary(v) for k, v in scores.items()}}
