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
ε̂ for a fully deleted x_t too (on the tiny MNIST model by about as much as for x_t itself,
the "floor" ≈ 0.9), and deleting pixels can *raise* f (curves peak near 1.8). |∂f/∂x_t|
ranks pixels by how much they change f in either direction, so it is not a deletion ranking:
on the tiny model at t = 200–300 it is *less* faithful than the random map on both curves.
The signed gradient × input Σ_c x_t ∂f/∂x_t is the first-order estimate of f(x_t) −
E f(x_t with that pixel deleted) (the replacement has mean 0 for both references), i.e. the
ranking deletion asks for; it beats the random map on insertion there (AUC +0.1…+0.9), not
reliably on deletion. `gradient_maps` returns both; the CLI scores both against random.

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
from safetensors.torch import save_file  # noqa: E402

from patronus.interpret.figures import render  # noqa: E402
from patronus.interpret.information import information_map_at, mosaic_figure, noise_draws, noisy, overlay_rgb, resolve_baseline
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


def gradient_maps(
    model: PatronusModel,
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
    s, alt = _conditions(model, x0, prototype, baseline_value, s)
    sums = {k: x0.new_zeros(x0.shape[0], *x0.shape[-2:], dtype=torch.float32)
            for k in ("saliency", "abs_gradient_x_input", "gradient_x_input")}
    for eps in noise_draws(x0, num_noise, torch.Generator().manual_seed(seed)):
        x_t = noisy(model, x0, eps, t).detach().requires_grad_(True)
        with torch.enable_grad():  # callers (the CLI) run under no_grad
            (grad,) = torch.autograd.grad(score(model, x_t, t, s, alt).sum(), x_t)  # f of image b depends on x_t[b] only
        gxi = (grad * x_t.detach()).sum(1)
        sums["saliency"] += grad.abs().sum(1)
        sums["abs_gradient_x_input"] += gxi.abs()
        sums["gradient_x_input"] += gxi
    return {k: v / num_noise for k, v in sums.items()}


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
    maps = gradient_maps(model, x0, prototype, t, baseline_value, num_noise, seed, s)
    return maps["abs_gradient_x_input" if times_input else "saliency"]


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
    s, alt = _conditions(model, x0, prototype, baseline_value, s)
    B, _, H, W = x0.shape
    fracs = torch.linspace(0, 1, fractions + 1)
    counts = (fracs[1:-1] * H * W).round().long().to(x0.device)  # pixels changed at each interior step
    mask = _ranks(maps.to(x0.device))[None] < counts[:, None, None]  # (F−1, B, H·W)
    mask = rearrange(mask, "f b (h w) -> f b 1 h w", h=H)
    gen = torch.Generator().manual_seed(seed)
    noise = noise_draws(x0, num_noise, gen)
    fresh = noise_draws(x0, num_noise, gen)
    sigma = model.noise_scheduler().alphas_cumprod[int(t)].mul(-1).add(1).sqrt().item()
    deletion, insertion, base = 0.0, 0.0, 0.0
    for eps, eps_new in zip(noise, fresh):
        x_t = noisy(model, x0, eps, t)  # (B, C, H, W)
        ref = sigma * eps_new if reference == "noise" else torch.zeros_like(x_t)
        deleted = torch.where(mask, ref, x_t)  # (F−1, B, C, H, W)
        inserted = torch.where(mask, x_t, ref)
        batch = rearrange(torch.cat([x_t[None], ref[None], deleted, inserted]), "f b c h w -> (f b) c h w")
        n = len(batch) // B
        f = rearrange(score(model, batch, t, repeat(s, "b k -> (f b) k", f=n), repeat(alt, "b k -> (f b) k", f=n)),
                      "(f b) -> b f", b=B)
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


def attribution_figure(images: torch.Tensor, x_t: torch.Tensor, saliency: torch.Tensor, information: torch.Tensor,
                       title: str = "", path: Optional[Path] = None, max_images: int = 8,
                       signed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per image a row: the image, x_t, the saliency map, the information map at t and, if given,
    the signed gradient × input (red: deleting the pixel lowers f, blue: raises it) (uint8 (3, H, W)).
    Each map on its own scale (0 or −max to its max)."""
    B = min(len(images), max_images)
    names = ["image", "x_t", "|∂f/∂x_t|", "½‖Δε̂‖² at t"] + (["x_t·∂f/∂x_t"] if signed is not None else [])
    blank = torch.zeros(images.shape[-2:])
    cells = []
    for b in range(B):
        xt = x_t[b].detach().float().cpu()
        row = [overlay_rgb(images[b], blank, 0, 1, alpha=0.0), overlay_rgb(xt / xt.abs().max().clamp_min(1e-12), blank, 0, 1, alpha=0.0)]
        row += [overlay_rgb(images[b], m[b], 0.0, float(m[b].max()) or 1.0, alpha=1.0) for m in (saliency, information)]
        if signed is not None:
            bound = float(signed[b].abs().max()) or 1.0
            row.append(overlay_rgb(images[b], signed[b], -bound, bound, "RdBu_r", alpha=1.0))
        cells.append(row)
    return mosaic_figure(cells, [[""] * len(names) for _ in range(B)], names, [str(b) for b in range(B)], title, path, inches=1.2)


def faithfulness_figure(scores: dict[str, dict[str, torch.Tensor]], title: str = "", path: Optional[Path] = None) -> torch.Tensor:
    """Deletion and insertion curves, mean over images, one line per map (AUC in the legend)."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for name, res in scores.items():
        x = res["fractions"].tolist()
        style = dict(color="grey", linestyle="--") if name == "random" else {}
        for ax, kind in zip(axes, ("deletion", "insertion")):
            ax.plot(x, res[f"{kind}_curve"].mean(0).cpu().tolist(), marker=".", **style,
                    label=f"{name} (AUC {float(res[f'{kind}_auc'].mean()):.3f})")
    for ax, kind, better in zip(axes, ("deletion", "insertion"), ("lower", "higher")):
        ax.axhline(1.0, color="black", linewidth=0.5)
        ax.set(xlabel=f"fraction of pixels {'deleted' if kind == 'deletion' else 'inserted'} (most important first)",
               ylabel="f / f(x_t)", title=f"{kind} ({better} AUC = more faithful)")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    return render(fig, path)


# --- CLI glue (wired into patronus.interpret.cli by the caller) ----------------------------


def add_attribution_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prototype", type=int, help="default: the prototype with the largest dataset std")
    parser.add_argument("--timestep", type=int, default=None, help="default: T/4")
    parser.add_argument("--baseline", choices=("zero", "median"), default="zero", help="value s_J is set to")
    parser.add_argument("--num-noise", type=int, default=4, help="x_t draws averaged by the saliency map")
    parser.add_argument("--fractions", type=int, default=10, help="deletion/insertion steps")
    parser.add_argument("--faithfulness-noise", type=int, default=1, help="x_t draws the deletion/insertion curves average")


def _summary(result: dict[str, torch.Tensor], chance: Optional[dict[str, torch.Tensor]] = None) -> dict:
    out = {
        "deletion_auc_mean": float(result["deletion_auc"].mean()),
        "insertion_auc_mean": float(result["insertion_auc"].mean()),
        "deletion_auc": result["deletion_auc"].tolist(),
        "insertion_auc": result["insertion_auc"].tolist(),
        "deletion_curve_mean": result["deletion_curve"].mean(0).tolist(),
        "insertion_curve_mean": result["insertion_curve"].mean(0).tolist(),
    }
    if chance is not None:  # how often this map beats the random ordering on the same x_t
        out["beats_random_deletion"] = float((result["deletion_auc"] < chance["deletion_auc"]).float().mean())
        out["beats_random_insertion"] = float((result["insertion_auc"] > chance["insertion_auc"]).float().mean())
    return out


def run_attribution(args: argparse.Namespace, model: PatronusModel, refs: torch.Tensor, stats: dict, out: Path) -> dict:
    """Saliency, signed gradient × input and information maps at one (prototype J, t), each
    scored by deletion/insertion against a random map on the same x_t; PNGs, tensors, numbers."""
    K, T = model.config.num_prototypes, model.config.num_train_timesteps
    j = args.prototype if args.prototype is not None else int(torch.tensor(stats["std"]).argmax())
    t = args.timestep if args.timestep is not None else T // 4
    if not 0 <= j < K or not 0 <= t < T:
        raise SystemExit(f"error: --prototype {j} / --timestep {t}: the model has K={K} prototypes and T={T} timesteps")
    seed = getattr(args, "seed", 0)
    value = float(resolve_baseline(args.baseline, K, stats)[j])
    s = model.encode(refs)
    grads = gradient_maps(model, refs, j, t, value, args.num_noise, seed, s=s)
    maps = {
        "saliency": grads["saliency"],
        "gradient_x_input": grads["gradient_x_input"],
        "information": information_map_at(model, refs, j, t, value, args.num_noise, seed, s=s),
        "random": random_map(refs[:, 0], seed),
    }
    x_t = noisy(model, refs, noise_draws(refs, 1, torch.Generator().manual_seed(seed))[0], t)
    title = f"prototype {j}, t={t}, s_J → {args.baseline} ({value:.3g})"
    attribution_figure(refs, x_t, maps["saliency"], maps["information"], title, out / "attribution.png",
                       signed=maps["gradient_x_input"])
    num = getattr(args, "faithfulness_noise", 1)
    scores = {k: faithfulness(model, refs, j, t, value, m, args.fractions, seed, num, s=s) for k, m in maps.items()}
    faithfulness_figure(scores, f"{title}: f(x_t with pixels deleted / inserted) / f(x_t), mean over images",
                        out / "faithfulness.png")
    save_file({**{f"map_{k}": v.detach().float().cpu().contiguous() for k, v in maps.items()},
               **{f"{k}_{c}": v[c].float().cpu().contiguous() for k, v in scores.items() for c in ("deletion_curve", "insertion_curve")},
               "fractions": scores["random"]["fractions"].float(), "x_t": x_t.float().cpu().contiguous()},
              str(out / "attribution.safetensors"))
    return {"prototype": j, "timestep": t, "baseline": args.baseline, "baseline_value": value, "num_noise": args.num_noise,
            "score_f_xt": scores["saliency"]["score"].tolist(), "floor_mean": float(scores["random"]["floor"].mean()),
            **{k: _summary(v, None if k == "random" else scores["random"]) for k, v in scores.items()}}
