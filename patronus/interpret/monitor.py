"""The interpretability probe logged during training (issue 5 §2), as plain functions.

One call computes, for a fixed probe batch and a fixed pool of real images: the prototype ×
timestep emergence heatmap of a short DDIM decode under the probe's own s, the pool's
activations and their per-prototype statistics, and each prototype's nearest real patches.
Tensors in, tensors/figures out; the Lightning callback (`patronus.callbacks.InterpretMonitor`)
only schedules it and sends the results to files and loggers, so the probe can also be run on
any checkpoint without a Trainer.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")  # no display on servers/CI; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torchvision.io import write_png  # noqa: E402

from patronus.interpret.emergence import emergence_curves, emergence_heatmap, trace_activations  # noqa: E402
from patronus.interpret.figures import render  # noqa: E402
from patronus.interpret.projection import PatchHit, min_distances, patch_gallery, top_patches  # noqa: E402
from patronus.interpret.stats import activation_statistics  # noqa: E402
from patronus.models.patronus import PatronusModel  # noqa: E402


@dataclass
class ProbeResult:
    """Everything one probe measured; `heatmap[:, -1]` is mean_b s(decoded_b) − s(x0_b)."""

    timesteps: torch.Tensor  # (S,) decreasing: the t whose x̂0(t) was re-encoded
    heatmap: torch.Tensor  # (K, S) mean over probe images of s(x̂0(t)) − s(x0)
    activations: torch.Tensor  # (S, B, K) s(clamp(x̂0(t))) per probe image
    s_ref: torch.Tensor  # (B, K) s(x0) of the probe images
    decoded: torch.Tensor  # (B, C, H, W) DDIM samples from x_T under s_ref (unclipped)
    pool_activations: torch.Tensor  # (N, K) s of the pool images
    stats: dict[str, Any]  # activation_statistics(pool_activations)
    hits: list[list[PatchHit]]  # per prototype, its top-k nearest pool patches
    hists: list[tuple[torch.Tensor, torch.Tensor]]  # per prototype (counts, edges) of pool_activations


@torch.no_grad()
def run_probe(
    model: PatronusModel,
    probe: torch.Tensor,
    x_T: torch.Tensor,
    pool: torch.Tensor,
    ddim_steps: int = 10,
    top_k: int = 5,
    bins: int = 30,
) -> ProbeResult:
    """Decode `x_T` under s(probe) with DDIM, re-encoding x̂0(t) at every step; encode the pool and
    find each prototype's nearest pool patches. `model` should be in eval mode (BatchNorm)."""
    dev = next(model.parameters()).device
    probe, x_T = probe.to(dev), x_T.to(dev)
    # 1. Emergence during a plain decode from fixed noise: when does each concept of s settle?
    s_ref = model.encode(probe)  # (B, K)
    trace = trace_activations(model, x_T, s_ref, num_steps=ddim_steps)
    mean, _ = emergence_curves(trace, s_ref)  # (S, K)
    # 2. Activation distribution over the pool (the dataset-level view of every prototype).
    dmin, where = min_distances(model, pool)  # (N, K) on the CPU: one pass for 2. and 3.
    pool_s = model.encoder.activations_from_distances(dmin).float()
    # 3. ProtoPNet projection onto the pool: where on real images each prototype fires.
    hits = top_patches(model, dmin, where, k=min(top_k, len(pool)))
    return ProbeResult(
        trace.timesteps, mean.T.float().cpu(), trace.activations.float().cpu(), s_ref.float().cpu(),
        trace.images.float().cpu(), pool_s, activation_statistics(pool_s), hits, histograms(pool_s, bins),
    )


def stats_table(stats: dict[str, Any]) -> tuple[list[str], list[list[float]]]:
    """Columns and one row per prototype (mean, std, quantiles) of `activation_statistics`' dict."""
    qs = list(stats["quantiles"])
    columns = ["prototype", "mean", "std", *[f"q{q}" for q in qs]]
    rows = [[j, stats["mean"][j], stats["std"][j], *[stats["quantiles"][q][j] for q in qs]] for j in range(len(stats["mean"]))]
    return columns, rows


def histograms(activations: torch.Tensor, bins: int = 30) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per prototype (counts, edges) over its own range: prototypes' activations differ in scale."""
    return [torch.histogram(col.contiguous().float().cpu(), bins=bins) for col in activations.T]


def histogram_figure(hists: list[tuple[torch.Tensor, torch.Tensor]], title: str, path: Optional[Path] = None) -> torch.Tensor:
    """Small multiples, one panel per prototype, its range in the title (tick labels cost most of
    the drawing time); uint8 (3, H, W), saved as PNG if `path` is given."""
    k = len(hists)
    cols = min(k, 6)
    rows = math.ceil(k / cols)
    height = 1.0 * rows + 0.4  # inches: 0.4 on top for the title
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, height), squeeze=False,
                             gridspec_kw={"hspace": 0.6, "wspace": 0.15, "top": 1 - 0.45 / height, "bottom": 0.1 / height})
    for j, ax in enumerate(axes.flat):
        if j >= k:
            ax.set_visible(False)
            continue
        counts, edges = hists[j]
        ax.stairs(counts.numpy(), edges.numpy(), fill=True, color="tab:blue")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"p{j}: {float(edges[0]):.3g} – {float(edges[-1]):.3g}", fontsize=6, pad=2)
    fig.suptitle(title, fontsize=8, y=1 - 0.05 / height, va="top")
    return render(fig, path)


def write_probe(result: ProbeResult, pool: torch.Tensor, x0: torch.Tensor, x_T: torch.Tensor, out: Path,
                step: Optional[int] = None, receptive_field: Optional[dict[str, Any]] = None) -> dict[str, torch.Tensor]:
    """Figures (PNG) and numbers (JSON, safetensors) of one probe under `out`; returns the figures
    as uint8 (3, H, W) tensors keyed by name, ready for the loggers."""
    out.mkdir(parents=True, exist_ok=True)
    at = f" (step {step})" if step is not None else ""
    K = result.heatmap.shape[0]
    figures = {
        "heatmap": emergence_heatmap(result.heatmap, result.timesteps, f"s(x̂0(t)) − s(x0), DDIM from s{at}",
                                     out / "heatmap.png", [f"p{j}" for j in range(K)]),
        "histograms": histogram_figure(result.hists, f"activations over {len(pool)} real images{at}", out / "histograms.png"),
        "gallery": patch_gallery(pool, result.hits),
    }
    write_png(figures["gallery"], str(out / "gallery.png"))
    tensors = {"heatmap": result.heatmap, "timesteps": result.timesteps, "activations": result.activations,
               "s_ref": result.s_ref, "x0": x0, "x_T": x_T, "decoded": result.decoded, "pool_activations": result.pool_activations}
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(out / "probe.safetensors"))
    (out / "stats.json").write_text(json.dumps({"step": step, **result.stats}, indent=1))
    gallery = {"step": step, "receptive_field": receptive_field, "hits": [[asdict(h) for h in row] for row in result.hits]}
    (out / "gallery.json").write_text(json.dumps(gallery))
    return figures


__all__ = ["ProbeResult", "histogram_figure", "histograms", "run_probe", "stats_table", "write_probe"]
