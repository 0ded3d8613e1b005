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

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from einops import rearrange, repeat

from patronus.edits import one_edit_each
from patronus.pipeline import PatronusPipeline


@dataclass
class EmergenceTrace:
    """Activations of the re-encoded x̂0(t) along one DDIM decode, from high t to low t."""

    timesteps: torch.Tensor  # (S,) long: the t whose x_t predicted x̂0(t); decreasing
    activations: torch.Tensor  # (S, B, K): s(clamp(x̂0(t))); the last entry is s(clamp(decoded image))
    images: torch.Tensor  # (B, C, H, W) the decoded images


def recorded_steps(steps: int, every: int = 1, inverted_steps: Optional[int] = None) -> list[int]:
    """Step indices to record of a decode of the last `inverted_steps` of `steps` steps (None: all):
    every k-th counted back from the last step, so the last is always kept and exactly ceil(n/k) of
    the n decoded steps are recorded."""
    if every < 1:
        raise ValueError(f"every={every}; expected ≥ 1")
    n = steps if inverted_steps is None else inverted_steps
    if not 0 < n <= steps:
        raise ValueError(f"inverted_steps={inverted_steps}; expected 1..steps={steps}")
    last = steps - 1
    return [i for i in range(steps - n, steps) if (last - i) % every == 0]


def trace_activations(
    pipe: PatronusPipeline,
    x_T: torch.Tensor,
    s: torch.Tensor,
    steps: int = 50,
    every: int = 1,
    inverted_steps: Optional[int] = None,
    batch_size: int = 256,
    s_plain: Optional[torch.Tensor] = None,
) -> EmergenceTrace:
    """Decode x_T under s with DDIM (or, with `inverted_steps`, the last that many steps from the
    latent an inversion of that many steps left) and record s(x̂0(t)) every `every` steps (the last
    step always).

    Chunks of ≤ `batch_size` images are decoded one after another, so many edits can share a call.
    With `s_plain` (the unedited activations of each row), s is an edit decoded with the
    pipeline's edit guidance relative to it.
    """
    keep = set(recorded_steps(steps, every, inverted_steps))
    timesteps: list[int] = []
    acts, images = [], []
    for i in range(0, len(x_T), batch_size):
        timesteps, chunk = [], []

        def record(step: int, t: int, x: torch.Tensor, pred_x0: torch.Tensor) -> None:
            if step in keep:
                timesteps.append(t)
                chunk.append(pipe.encode(pred_x0.clamp(-1, 1)).s)  # (B, K); early x̂0 overshoot far

        # The last step is always kept, and with ᾱ_final = 1 its x̂0 *is* the decoded image, so the
        # last entry is s(decoded image): clamped like every other entry (unclamped decodes of a
        # small model overshoot [-1, 1] enough to move s by as much as the whole curve).
        rows = slice(i, i + batch_size)
        if s_plain is None:
            images.append(pipe.denoise(x_T[rows], s[rows], steps, inverted_steps=inverted_steps, clip=False, callback=record))
        else:
            images.append(pipe.decode_edited(x_T[rows], s[rows], s_plain[rows], steps, inverted_steps=inverted_steps, callback=record))
        acts.append(torch.stack(chunk))  # (S, B, K)
    return EmergenceTrace(torch.tensor(timesteps, dtype=torch.long), torch.cat(acts, dim=1), torch.cat(images))


def emergence_curves(activations: torch.Tensor, s_ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std over images (S, K) of s(x̂0(t)) − s(x0) from traced activations (S, B, K):
    how far each concept is from the original."""
    diff = activations - s_ref[None].to(activations)  # (S, B, K)
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


def edit_emergence(
    pipe: PatronusPipeline,
    x0: torch.Tensor,
    prototypes: Sequence[int],
    s_target: torch.Tensor,
    steps: int = 50,
    every: int = 1,
    batch_size: int = 256,
) -> EditEmergence:
    """Invert x0 under its own s, then decode the plain s and, per J, s with s_J = s_target[J],
    all from the same x_T in one traced batch of (P + 1)·B images (chunked by `batch_size`)."""
    # 1. Invert under the images' own activations.
    x0 = x0.to(pipe.device)
    s = pipe.encode(x0).s  # (B, K)
    x_T = pipe.invert(x0, s, steps)
    # 2. One condition batch per decode: plain first, then s_J set to its target for each J.
    idx = torch.tensor(list(prototypes), dtype=torch.long, device=s.device)  # (P,)
    n = len(idx) + 1
    target = s_target.to(s)[idx]  # (P,)
    conds = torch.cat([s[None], one_edit_each(s, list(prototypes), s_target.to(s))])  # (P + 1, B, K)
    # 3. Decode and trace everything at once.
    trace = trace_activations(
        pipe,
        repeat(x_T, "b ... -> (n b) ...", n=n),
        rearrange(conds, "n b k -> (n b) k"),
        steps,
        every,
        batch_size=batch_size,
        s_plain=repeat(s, "b k -> (n b) k", n=n),
    )
    acts = rearrange(trace.activations, "s (n b) k -> s n b k", n=n)
    plain = acts[:, 0]  # (S, B, K)
    gather = repeat(idx, "p -> s p b 1", s=acts.shape[0], b=acts.shape[2])
    edited = rearrange(acts[:, 1:].gather(3, gather), "s p b 1 -> s b p")  # s_J of edit J
    # 4. Curves of s_J only, relative to the original image.
    ref = s[:, idx]  # (B, P)
    mean, std = emergence_curves(edited, ref)
    plain_mean, plain_std = emergence_curves(plain[..., idx], ref)
    return EditEmergence(
        list(prototypes),
        trace.timesteps,
        s,
        target,
        plain,
        edited,
        mean,
        std,
        plain_mean,
        plain_std,
        times=emergence_times(trace.timesteps, mean),
        effect_times=emergence_times(trace.timesteps, mean - plain_mean),
        images=rearrange(trace.images, "(n b) ... -> n b ...", n=n),
    )


def plain_settling(res: EditEmergence) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The unedited decode of `res` for every prototype, not only the edited ones: mean and std over
    images (S, K) of s(x̂0(t)) − s(x0), and the timestep (K,) where each curve settles (reaches half
    of its final rise or fall and stays: `emergence_times`, two-sided)."""
    mean, std = emergence_curves(res.plain, res.s_ref)
    return mean, std, emergence_times(res.timesteps, mean, two_sided=True)
