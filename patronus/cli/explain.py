"""`python -m patronus information|attribution`: where and when a prototype informs the denoiser.

The estimators live in `patronus.interpret.information` and `patronus.interpret.attribution`
(pure functions of the pipeline and tensors); here they are run on a command's images, drawn
with `patronus.plots` and written under `ctx.out` as PNGs, one safetensors file of the raw
tensors and the returned dict of summary numbers (written as JSON by `patronus.cli.analyses`).
"""

from __future__ import annotations

from typing import Literal, Optional, Union

import torch
from einops import reduce
from safetensors.torch import save_file

from patronus import plots
from patronus.cli.common import Context, check_positive
from patronus.interpret.attribution import faithfulness, gradient_maps, random_map
from patronus.interpret.information import (
    information_map_at,
    log_snr,
    noise_draws,
    noisy,
    pairwise_decomposition,
    prototype_information,
    resolve_baseline,
    top_pairs,
)

Prototypes = Union[list[int], int, None]
BaselineName = Literal["zero", "median"]


def _storable(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().cpu().contiguous()
    return x.float() if x.is_floating_point() else x


def cmd_information(
    ctx: Context,
    num_images: int = 8,
    prototypes: Prototypes = None,
    baseline: BaselineName = "zero",
    num_timesteps: int = 8,
    num_noise: int = 1,
    pairs: int = 3,
) -> dict:
    """Where and when each prototype informs the denoiser (nats per pixel / timestep), PID of top pairs.

    Defaults are sized for 2 CPU cores ((K+1) conditions × images × nodes × draws denoiser
    passes); how close 8 log-SNR nodes and 1 ε per node come to a fine reference is measured in
    docs/benchmarks.md (the maps are noisier than the totals: raise num_noise for smoother ones).

    Args:
        num_images: reference images.
        prototypes: prototypes to measure, e.g. [3,7] (default: all).
        baseline: what "without prototype J" means: s_J = 0 (zero) or s_J = its dataset median (median).
        num_timesteps: quadrature nodes, even in log-SNR over [0, T−1] (at least 2).
        num_noise: ε draws per node, shared by all conditions.
        pairs: decompose the top-r prototype pairs (0: none).
    """
    check_positive(num_noise=num_noise)
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps={num_timesteps}; a quadrature needs at least 2 nodes")
    if pairs < 0:
        raise ValueError(f"pairs={pairs}; expected 0 (no decomposition) or more")
    pipe = ctx.pipe
    checked = ctx.check_prototypes(prototypes)
    prototypes = list(dict.fromkeys(checked)) if checked is not None else list(range(pipe.num_prototypes))  # dedupe, keep order
    refs = ctx.images(num_images).to(pipe.device)
    stats = ctx.statistics() if baseline == "median" else None  # "zero" needs no statistics
    kw = dict(baseline=baseline, num_timesteps=num_timesteps, num_noise=num_noise, seed=ctx.seed, stats=stats)
    s = pipe.encode(refs).s
    res = prototype_information(pipe, refs, prototypes, s=s, **kw)
    plots.information_figure(refs, res, ctx.out / "information.png")
    plots.when_figure(res, ctx.out / "information_when.png", pipe.model)
    tensors = {
        "pixel": res.pixel,
        "curve": res.curve,
        "timesteps": res.timesteps,
        "weights": res.weights,
        "log_snr": log_snr(pipe.model, res.timesteps),
        "total": res.total,
        "prototypes": torch.tensor(prototypes),
        "s": s,
    }
    summary = {
        "images": len(refs),
        "baseline": baseline,
        "prototypes": prototypes,
        "timesteps": res.timesteps.tolist(),
        "num_noise": num_noise,
        "information_mean_nats": res.total.mean(0).tolist(),
        "when_argmax_timestep": res.timesteps[res.curve.mean(0).argmax(-1).cpu()].tolist(),
    }
    top = top_pairs(res.total, prototypes, pairs) if pairs > 0 and len(prototypes) > 1 else []
    if top:
        pid = pairwise_decomposition(pipe, refs, top, s=s, singles=res, **kw)  # reuses the single edits
        plots.pid_figure(refs, pid, top, ctx.out / "pid.png")
        tensors |= {f"pid_{k}": v for k, v in pid.items()} | {"pairs": torch.tensor(top)}
        summary["pairs"] = [list(p) for p in top]
        summary["pid_mean_nats"] = {k: reduce(v, "b p h w -> p", "sum").div(len(refs)).tolist() for k, v in pid.items()}
    save_file({k: _storable(v) for k, v in tensors.items()}, str(ctx.out / "information.safetensors"))
    return summary


def _faithfulness_summary(result: dict[str, torch.Tensor], chance: Optional[dict[str, torch.Tensor]] = None) -> dict:
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


def cmd_attribution(
    ctx: Context,
    num_images: int = 8,
    prototype: Optional[int] = None,
    timestep: Optional[int] = None,
    baseline: BaselineName = "zero",
    num_noise: int = 4,
    fractions: int = 10,
    faithfulness_noise: int = 1,
) -> dict:
    """Saliency of x_t for one prototype at one timestep, deletion/insertion faithfulness vs random.

    Saliency, signed gradient × input and the information map at (prototype J, t), each scored
    by deletion/insertion against a random map on the same x_t.

    Args:
        num_images: reference images.
        prototype: the prototype J (default: the one with the largest dataset std).
        timestep: the timestep t (default: T/4).
        baseline: the value s_J is set to: 0 (zero) or its dataset median (median).
        num_noise: x_t draws the saliency and information maps average.
        fractions: deletion/insertion steps.
        faithfulness_noise: x_t draws the deletion/insertion curves average.
    """
    check_positive(num_noise=num_noise, fractions=fractions, faithfulness_noise=faithfulness_noise)
    pipe = ctx.pipe
    K, T = pipe.num_prototypes, pipe.model.config.num_train_timesteps
    if prototype is not None and not 0 <= prototype < K:
        raise ValueError(f"prototype {prototype}: the model has K={K} prototypes (0..{K - 1})")
    if timestep is not None and not 0 <= timestep < T:
        raise ValueError(f"timestep {timestep}: the model has T={T} timesteps (0..{T - 1})")
    refs = ctx.images(num_images).to(pipe.device)
    stats = ctx.statistics()
    j = prototype if prototype is not None else int(torch.tensor(stats["std"]).argmax())
    t = timestep if timestep is not None else T // 4
    seed = ctx.seed
    value = float(resolve_baseline(baseline, K, stats)[j])
    s = pipe.encode(refs).s
    grads = gradient_maps(pipe, refs, j, t, value, num_noise, seed, s=s)
    maps = {
        "saliency": grads["saliency"],
        "gradient_x_input": grads["gradient_x_input"],
        "information": information_map_at(pipe, refs, j, t, value, num_noise, seed, s=s),
        "random": random_map(refs[:, 0], seed),
    }
    x_t = noisy(pipe.model, refs, noise_draws(refs, 1, torch.Generator().manual_seed(seed))[0], t)
    title = f"prototype {j}, t={t}, s_J → {baseline} ({value:.3g})"
    plots.attribution_figure(
        refs, x_t, maps["saliency"], maps["information"], title, ctx.out / "attribution.png", signed=maps["gradient_x_input"]
    )
    scores = {k: faithfulness(pipe, refs, j, t, value, m, fractions, seed, faithfulness_noise, s=s) for k, m in maps.items()}
    plots.faithfulness_figure(
        scores, f"{title}: f(x_t with pixels deleted / inserted) / f(x_t), mean over images", ctx.out / "faithfulness.png"
    )
    save_file(
        {
            **{f"map_{k}": _storable(v) for k, v in maps.items()},
            **{f"{k}_{c}": _storable(v[c]) for k, v in scores.items() for c in ("deletion_curve", "insertion_curve")},
            "fractions": _storable(scores["random"]["fractions"]),
            "x_t": _storable(x_t),
        },
        str(ctx.out / "attribution.safetensors"),
    )
    return {
        "prototype": j,
        "timestep": t,
        "baseline": baseline,
        "baseline_value": value,
        "num_noise": num_noise,
        "score_f_xt": scores["saliency"]["score"].tolist(),
        "floor_mean": float(scores["random"]["floor"].mean()),
        **{k: _faithfulness_summary(v, None if k == "random" else scores["random"]) for k, v in scores.items()},
    }
