"""When does a prototype's concept appear during denoising? (Patronus, emergence over time.)

While DDIM decodes (plain or with edited activations), the predicted clean image x̂0(t) of
every step (or every k-th) is clamped to [-1, 1] and re-encoded: s(x̂0(t)) for all K prototypes.
The emergence curve of prototype J is s_J(x̂0(t) | edited s) − s_J(x0), mean ± std over images;
its emergence time is the timestep where the curve reaches half of its final rise (and stays).
Diffusion models typically fix coarse structure at high t and fine detail at low t; the time
says which kind prototype J's concept is, and so how much noise an edit of J needs
(`localise --partial-steps`).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # no display on servers/CI; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from einops import rearrange, repeat  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from patronus.diffusion import ddim_invert, ddim_sample  # noqa: E402
from patronus.interpret.edits import most_variable_prototypes  # noqa: E402
from patronus.interpret.figures import heatmap, render  # noqa: E402
from patronus.models.patronus import PatronusModel  # noqa: E402


@dataclass
class EmergenceTrace:
    """Activations of the re-encoded x̂0(t) along one DDIM decode, from high t to low t."""

    timesteps: torch.Tensor  # (S,) long: the t whose x_t predicted x̂0(t); decreasing
    activations: torch.Tensor  # (S, B, K): s(clamp(x̂0(t))); the last entry is s(clamp(decoded image))
    images: torch.Tensor  # (B, C, H, W) the decoded images


def recorded_steps(num_steps: int, every: int = 1, start_step: int = 0) -> list[int]:
    """Step indices to record: every k-th counted back from the last step, so the last is always
    kept and exactly ceil(n/k) of the n = num_steps − start_step steps are recorded."""
    if every < 1:
        raise ValueError(f"every={every}; expected ≥ 1")
    if not 0 <= start_step < num_steps:
        raise ValueError(f"start_step={start_step}; expected 0..{num_steps - 1}")
    last = num_steps - 1
    return [i for i in range(start_step, num_steps) if (last - i) % every == 0]


@torch.no_grad()
def _trace_batch(
    model: PatronusModel, x_T: torch.Tensor, s: torch.Tensor, num_steps: int, keep: set[int], start_step: int
) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """One DDIM decode whose callback re-encodes the clamped x̂0 at the kept steps."""
    timesteps, acts = [], []

    def record(i: int, t: int, x: torch.Tensor, pred_x0: torch.Tensor) -> None:
        if i in keep:
            timesteps.append(t)
            acts.append(model.encode(pred_x0.clamp(-1, 1)))  # (B, K); early x̂0 overshoot far

    # The last step is always kept, and with set_alpha_to_one its x̂0 *is* the decoded image, so
    # the last entry is s(decoded image): clamped like every other entry (unclamped decodes of a
    # small model overshoot [-1, 1] enough to move s by as much as the whole curve).
    images = ddim_sample(model, x_T, s, num_steps, start_step=start_step, callback=record, clip=False)
    return timesteps, torch.stack(acts), images  # (S,), (S, B, K), (B, C, H, W)


@torch.no_grad()
def trace_activations(
    model: PatronusModel,
    x_T: torch.Tensor,
    s: torch.Tensor,
    num_steps: int = 50,
    every: int = 1,
    start_step: int = 0,
    batch_size: int = 256,
) -> EmergenceTrace:
    """Decode x_T under s with DDIM and record s(x̂0(t)) every `every` steps (the last step always).

    Chunks of ≤ `batch_size` images are decoded one after another, so many edits can share a call.
    """
    keep = set(recorded_steps(num_steps, every, start_step))
    timesteps, acts, images = [], [], []
    for i in range(0, len(x_T), batch_size):
        timesteps, a, img = _trace_batch(model, x_T[i : i + batch_size], s[i : i + batch_size], num_steps, keep, start_step)
        acts.append(a)
        images.append(img)
    return EmergenceTrace(torch.tensor(timesteps, dtype=torch.long), torch.cat(acts, dim=1), torch.cat(images))


def emergence_curves(trace: EmergenceTrace, s_ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std over images (S, K) of s(x̂0(t)) − s(x0): how far each concept is from the original."""
    diff = trace.activations - s_ref[None].to(trace.activations)  # (S, B, K)
    std = diff.std(dim=1) if diff.shape[1] > 1 else torch.zeros_like(diff[:, 0])
    return diff.mean(dim=1), std


def emergence_times(
    timesteps: torch.Tensor, curve: torch.Tensor, fraction: float = 0.5, eps: float = 1e-6, two_sided: bool = False
) -> torch.Tensor:
    """Per column of `curve` (S, K), the timestep where it reaches `fraction` of its final rise and
    stays there; linearly interpolated between recorded steps, NaN where the rise ≤ eps.

    The rise is final value − lowest value: early x̂0 are blurry averages whose activations may
    dip below (or start above) where the concept ends, and a monotone rise gives the same answer
    as "final − first". "Stays" skips such early excursions through the level; for a monotone
    curve it is the first crossing. `two_sided` also times falling curves (whichever of the rise
    or the fall to the final value is larger): when a concept *settles*.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction}; expected 0 < fraction ≤ 1")
    c = curve.float()  # (S, K)
    if two_sided:  # mirror curves whose fall to the end is larger than their rise
        fall = c.max(dim=0).values - c[-1] > c[-1] - c.min(dim=0).values  # (K,)
        c = torch.where(fall, -c, c)
    low = c.min(dim=0).values  # (K,)
    rise = c[-1] - low
    level = low + fraction * rise  # (K,)
    below = c < level  # (S, K); the last step never is
    last = len(c) - 1 - below.flip(0).float().argmax(dim=0)  # (K,) last step under the level
    nxt = (last + 1).clamp(max=len(c) - 1)
    c0, c1 = c.gather(0, last[None])[0], c.gather(0, nxt[None])[0]  # (K,)
    t = timesteps.to(c)
    w = ((level - c0) / (c1 - c0)).nan_to_num(0.0).clamp(0, 1)
    times = t[last] + w * (t[nxt] - t[last])
    return torch.where((rise > eps) & below.any(dim=0), times, torch.full_like(times, math.nan))


@dataclass
class EditEmergence:
    """Prototype J raised to its target, one J at a time, from the same inverted x_T: when does it appear?"""

    prototypes: list[int]
    timesteps: torch.Tensor  # (S,)
    s_ref: torch.Tensor  # (B, K) s(x0)
    s_target: torch.Tensor  # (P,) the value each edit sets s_J to
    plain: torch.Tensor  # (S, B, K) s(x̂0(t)) of the unedited decode, every prototype
    edited: torch.Tensor  # (S, B, P) s_J(x̂0(t)) of the decode with s_J = s_target[J]
    mean: torch.Tensor  # (S, P) mean over images of s_J(x̂0(t) | edited) − s_J(x0)
    std: torch.Tensor  # (S, P)
    plain_mean: torch.Tensor  # (S, P) the same for the plain decode
    plain_std: torch.Tensor  # (S, P)
    times: torch.Tensor  # (P,) emergence time of `mean`
    effect_times: torch.Tensor  # (P,) emergence time of `effect`: the edit's own share
    images: torch.Tensor  # (P + 1, B, C, H, W) the plain decode first, then one row per edit

    @property
    def effect(self) -> torch.Tensor:
        """(S, P) edited − plain: what the edit adds beyond the ordinary reconstruction."""
        return self.mean - self.plain_mean


@torch.no_grad()
def edit_emergence(
    model: PatronusModel,
    x0: torch.Tensor,
    prototypes: Sequence[int],
    s_target: torch.Tensor,
    num_steps: int = 50,
    every: int = 1,
    batch_size: int = 256,
) -> EditEmergence:
    """Invert x0 under its own s, then decode the plain s and, per J, s with s_J = s_target[J],
    all from the same x_T in one traced batch of (P + 1)·B images (chunked by `batch_size`)."""
    # 1. Invert under the images' own activations.
    s = model.encode(x0)  # (B, K)
    x_T = ddim_invert(model, x0, s, num_steps)
    # 2. One condition batch per decode: plain first, then s_J set to its target for each J.
    idx = torch.tensor(list(prototypes), dtype=torch.long, device=s.device)  # (P,)
    n = len(idx) + 1
    target = s_target.to(s)[idx]  # (P,)
    conds = repeat(s, "b k -> n b k", n=n).clone()
    conds[torch.arange(1, n, device=s.device), :, idx] = target[:, None]  # (P, B) entries
    # 3. Decode and trace everything at once.
    trace = trace_activations(
        model, repeat(x_T, "b ... -> (n b) ...", n=n), rearrange(conds, "n b k -> (n b) k"), num_steps, every,
        batch_size=batch_size,
    )
    acts = rearrange(trace.activations, "s (n b) k -> s n b k", n=n)
    plain = acts[:, 0]  # (S, B, K)
    gather = repeat(idx, "p -> s p b 1", s=acts.shape[0], b=acts.shape[2])
    edited = rearrange(acts[:, 1:].gather(3, gather), "s p b 1 -> s b p")  # s_J of edit J
    # 4. Curves of s_J only, relative to the original image.
    ref = s[:, idx]  # (B, P)
    mean, std = emergence_curves(EmergenceTrace(trace.timesteps, edited, trace.images), ref)
    plain_mean, plain_std = emergence_curves(EmergenceTrace(trace.timesteps, plain[..., idx], trace.images), ref)
    return EditEmergence(
        list(prototypes), trace.timesteps, s, target, plain, edited, mean, std, plain_mean, plain_std,
        times=emergence_times(trace.timesteps, mean),
        effect_times=emergence_times(trace.timesteps, mean - plain_mean),
        images=rearrange(trace.images, "(n b) ... -> n b ...", n=n),
    )


def emergence_heatmap(
    values: torch.Tensor,
    timesteps: torch.Tensor,
    title: str,
    path: Optional[Path] = None,
    ylabels: Optional[Sequence[str]] = None,
    colorbar_label: str = "Δ activation",
) -> torch.Tensor:
    """Prototype × timestep heatmap of `values` (K, S), t decreasing left→right as in decoding,
    diverging colours centred at 0; uint8 (3, H, W), saved as PNG if `path` is given."""
    ylabels = list(ylabels) if ylabels is not None else [str(j) for j in range(len(values))]
    return heatmap(
        values, xlabels=[str(int(t)) for t in timesteps], ylabels=ylabels, title=title, xlabel="timestep t (decoding →)",
        ylabel="prototype", diverging=True, colorbar_label=colorbar_label, path=path,
    )


def emergence_curve_plot(
    mean: torch.Tensor,
    std: torch.Tensor,
    timesteps: torch.Tensor,
    labels: Sequence[str],
    path: Optional[Path] = None,
    title: str = "emergence: s_J(x̂0(t)) − s_J(x0)",
    fraction: float = 0.5,
) -> torch.Tensor:
    """Mean ± std curves (S, P) against t (decreasing left→right), each with its emergence time
    marked; uint8 (3, H, W), saved as PNG if `path` is given."""
    m, sd, t = mean.float().cpu(), std.float().cpu(), timesteps.float().cpu()
    times = emergence_times(t, m, fraction)
    fig, ax = plt.subplots(figsize=(7, 4))
    for j, label in enumerate(labels):
        (line,) = ax.plot(t, m[:, j], label=label, lw=1.5)
        ax.fill_between(t, m[:, j] - sd[:, j], m[:, j] + sd[:, j], color=line.get_color(), alpha=0.15, lw=0)
        if not math.isnan(float(times[j])):
            low = float(m[:, j].min())
            level = low + fraction * (float(m[-1, j]) - low)
            ax.axvline(float(times[j]), color=line.get_color(), ls=":", lw=1)
            ax.plot([float(times[j])], [level], "o", color=line.get_color(), ms=5)
    ax.axhline(0, color="0.5", lw=0.8)
    ax.invert_xaxis()  # decoding runs from t = T to 0
    ax.set(title=title, xlabel="timestep t (decoding →); dots: emergence time", ylabel="Δ activation")
    ax.legend(fontsize=7, ncol=2)
    return render(fig, path)


def add_emergence_args(parser: argparse.ArgumentParser) -> None:
    """CLI options of `python -m patronus emergence`."""
    parser.add_argument("--prototypes", type=int, nargs="+",
                        help="prototypes to raise (default: the 8 most variable over the images, all if K ≤ 8)")
    parser.add_argument("--every", type=int, default=1, help="re-encode x̂0 every k-th DDIM step (the last always)")


def _json_times(times: torch.Tensor) -> list[Optional[float]]:
    return [None if math.isnan(x) else x for x in times.tolist()]


@torch.no_grad()
def run_emergence(args: argparse.Namespace, model: PatronusModel, refs: torch.Tensor, s_max: torch.Tensor, out: Path) -> dict:
    """Raise each chosen prototype to its dataset max in `refs` and record when it appears; figures,
    raw tensors (`emergence.safetensors`) and a JSON-able summary."""
    K = model.config.num_prototypes
    s_ref = model.encode(refs)
    prototypes = args.prototypes if args.prototypes is not None else most_variable_prototypes(s_ref, min(8, K))
    bad = [j for j in prototypes if not 0 <= j < K]
    if bad:
        raise SystemExit(f"error: --prototypes {bad}: the model has K={K} prototypes")
    res = edit_emergence(model, refs, prototypes, s_max, args.steps, args.every)
    names = [f"p{j}" for j in prototypes]
    emergence_heatmap(res.effect.T, res.timesteps, "edit effect: s_J(x̂0(t) | s_J = max) − s_J(x̂0(t) | plain)",
                      out / "emergence_heatmap.png", names)
    emergence_curve_plot(res.mean, res.std, res.timesteps, [f"p{j} → {float(v):.3g}" for j, v in zip(prototypes, res.s_target)],
                         out / "emergence_curves.png", title="s_J(x̂0(t) | s_J = max) − s_J(x0), mean ± std")
    plain_mean, plain_std = emergence_curves(EmergenceTrace(res.timesteps, res.plain, res.images[0]), res.s_ref)  # (S, K)
    emergence_heatmap(plain_mean.T, res.timesteps, "plain reconstruction: s(x̂0(t)) − s(x0)", out / "plain_heatmap.png",
                      [f"p{j}" for j in range(K)])
    settle = emergence_times(res.timesteps, plain_mean, two_sided=True)  # (K,)
    tensors = {
        "timesteps": res.timesteps, "prototypes": torch.tensor(prototypes, dtype=torch.long), "s_ref": res.s_ref,
        "s_target": res.s_target, "plain": res.plain, "edited": res.edited, "mean": res.mean, "std": res.std,
        "plain_mean": res.plain_mean, "plain_std": res.plain_std, "times": res.times, "effect_times": res.effect_times,
        "plain_mean_all": plain_mean, "plain_std_all": plain_std, "plain_settle_times": settle,
    }
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(out / "emergence.safetensors"))
    return {
        "images": len(refs), "steps": args.steps, "every": args.every, "prototypes": list(prototypes),
        "timesteps": res.timesteps.tolist(),
        "emergence_time": dict(zip(map(str, prototypes), _json_times(res.times))),
        "effect_emergence_time": dict(zip(map(str, prototypes), _json_times(res.effect_times))),
        "final_rise": dict(zip(map(str, prototypes), res.mean[-1].tolist())),
        "plain_final_difference": dict(zip(map(str, prototypes), res.plain_mean[-1].tolist())),
        "mean_curves": {str(j): res.mean[:, p].tolist() for p, j in enumerate(prototypes)},
        "effect_curves": {str(j): res.effect[:, p].tolist() for p, j in enumerate(prototypes)},
        "plain_settle_time": _json_times(settle),
    }
