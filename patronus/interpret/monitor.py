"""The interpretability probe logged during training (issue 5 §2), as plain functions.

One call computes, for a fixed probe batch and a fixed pool of real images: the prototype ×
timestep emergence heatmap of a short DDIM decode under the probe's own s, the pool's
activations and their per-prototype statistics, and each prototype's nearest real patches.
Pipeline and tensors in, tensors out; the Lightning callback
(`patronus.training.callbacks.InterpretMonitor`) only schedules it and sends the results to
files (figures via `patronus.plots`) and loggers, so the probe can also be run on any
checkpoint without a Trainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from patronus.interpret.emergence import emergence_curves, trace_activations
from patronus.interpret.projection import PatchHit, top_patches
from patronus.interpret.stats import activation_statistics
from patronus.pipeline import PatronusPipeline


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


def run_probe(
    pipe: PatronusPipeline,
    probe: torch.Tensor,
    x_T: torch.Tensor,
    pool: torch.Tensor,
    steps: int = 10,
    top_k: int = 5,
    bins: int = 30,
) -> ProbeResult:
    """Decode `x_T` under s(probe) with DDIM, re-encoding x̂0(t) at every step; encode the pool and
    find each prototype's nearest pool patches."""
    probe, x_T = probe.to(pipe.device), x_T.to(pipe.device)
    # 1. Emergence during a plain decode from fixed noise: when does each concept of s settle?
    s_ref = pipe.encode(probe).s  # (B, K)
    trace = trace_activations(pipe, x_T, s_ref, steps=steps)
    mean, _ = emergence_curves(trace.activations, s_ref)  # (S, K)
    # 2. Activation distribution over the pool (the dataset-level view of every prototype).
    pool_acts = pipe.encode(pool.cpu())  # one pass for 2. and 3., on the CPU
    pool_s = pool_acts.s.float()
    # 3. ProtoPNet projection onto the pool: where on real images each prototype fires.
    hits = top_patches(pipe, pool_acts.distances, pool_acts.where, k=min(top_k, len(pool)))
    return ProbeResult(
        trace.timesteps,
        mean.T.float().cpu(),
        trace.activations.float().cpu(),
        s_ref.float().cpu(),
        trace.images.float().cpu(),
        pool_s,
        activation_statistics(pool_s),
        hits,
        histograms(pool_s, bins),
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


__all__ = ["ProbeResult", "histograms", "run_probe", "stats_table"]
