"""The one way to change prototype activations: set / scale / add, one or several prototypes at once.

Every caller that changes a prototype's value (sample.py's edits, the analyses' raise/suppress
and baselines, the shortcut report's causal check and mitigation, training with held
prototypes) goes through `apply_edits`, so "edit" means the same thing everywhere: log-
similarities are clamped at 0 and every other prototype is left bit-for-bit untouched.
`follow_correlations` and `follow_neighbours` then optionally let the other prototypes move with
the edited ones as they do in real data (a "correlated" or "neighbours" edit: the edited `s` stays
one like the generator has seen).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch

Op = Literal["set", "scale", "add"]
# A number, a named level resolved from `levels` ("q99", "q01", "median", "mean", "q95", ...), or a
# tensor of per-image values (B,) / one value (): what an edit sets, multiplies by or adds.
Value = Union[float, str, torch.Tensor]
_LEVEL = r"median|mean|q\d\d"
# Level names that were renamed: an edit that still uses one is told the new name.
RENAMED_LEVELS = {"max": "q99", "min": "q01"}
_SPEC = re.compile(rf"^\s*(\d+)\s*(=|\*|\+|-)\s*({_LEVEL}|max|min|[0-9.eE+-]+?)\s*(sd)?\s*$")


@dataclass(frozen=True)
class Edit:
    """One change to prototype `prototype`: set to / multiply by / add `value` (× the prototype's
    own `unit`, e.g. "sd": its standard deviation over the data, so "+2sd" means the same for
    every prototype whatever its scale)."""

    prototype: int
    op: Op
    value: Value
    unit: Optional[str] = None

    def __str__(self) -> str:
        sym = {"set": "=", "scale": "*", "add": "+"}[self.op]
        value = self.value
        if isinstance(value, torch.Tensor):
            value = f"{float(value.float().mean()):.4g}" if value.numel() else "[]"
        return f"{self.prototype}{sym}{value}{self.unit or ''}"


def parse_edit(spec: str, num_prototypes: int) -> list[Edit]:
    """'3=q99' | '3=q95' | '7=0' | '5*2' | '2+1.5' | '4-0.5' | '2+2sd' | '4-1sd', comma-joined for one
    combined edit ('3=q99,7=q01'). Levels (qNN quantiles such as q99 and q01, median, mean) and sd
    come from the data's activation statistics."""
    edits = []
    for part in spec.split(","):
        m = _SPEC.match(part)
        if not m:
            raise ValueError(
                f"edit {spec!r}: cannot parse {part!r}; expected J=VALUE, J*FACTOR, J+DELTA or J-DELTA "
                "with VALUE a number, qNN (q99, q01, ...), median or mean, and DELTA a number or Nsd (e.g. 3=q99,7=0,5+2sd)"
            )
        j, sym, raw, unit = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if raw in RENAMED_LEVELS:
            raise ValueError(f"edit {spec!r}: '{raw}' is now called '{RENAMED_LEVELS[raw]}' (write {j}{sym}{RENAMED_LEVELS[raw]})")
        if not 0 <= j < num_prototypes:
            raise ValueError(f"edit {spec!r}: prototype {j} does not exist; the model has K={num_prototypes} (0..{num_prototypes - 1})")
        if re.fullmatch(_LEVEL, raw):
            if sym != "=" or unit:
                raise ValueError(f"edit {spec!r}: '{raw}' only works with '=' (got {sym!r}{unit or ''})")
            value: Value = raw
        else:
            try:
                value = float(raw)
            except ValueError:
                raise ValueError(f"edit {spec!r}: {raw!r} is not a number") from None
        op: Op = {"=": "set", "*": "scale", "+": "add", "-": "add"}[sym]
        if unit and op != "add":
            raise ValueError(f"edit {spec!r}: 'sd' units only work with '+' or '-' (e.g. {j}+2sd)")
        if sym == "-":
            value = -float(value)
        edits.append(Edit(j, op, value, unit))
    return edits


def _level(name: str, j: int, s: torch.Tensor, levels: Optional[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    if name in RENAMED_LEVELS and not (levels and name in levels):
        raise ValueError(f"edit value {name!r} is now called {RENAMED_LEVELS[name]!r}")
    if not levels or name not in levels:
        raise ValueError(f"edit value {name!r} needs activation statistics with {name!r} (levels={sorted(levels or {})})")
    level = levels[name].to(s)
    return (level[..., j] if level.ndim else level).expand(len(s))


def _resolve(e: Edit, s: torch.Tensor, levels: Optional[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """The value of edit e as a (B,) tensor on s's device, in s units."""
    if isinstance(e.value, str):
        value = _level(e.value, e.prototype, s, levels)
    elif isinstance(e.value, torch.Tensor):
        value = e.value.to(s).expand(len(s))
    else:
        value = torch.full((len(s),), float(e.value), dtype=s.dtype, device=s.device)
    return value * _level(e.unit, e.prototype, s, levels) if e.unit else value


def apply_edits(s: torch.Tensor, edits: Sequence[Edit], levels: Optional[Mapping[str, torch.Tensor]] = None) -> torch.Tensor:
    """New activations (B, K) with every edit applied in order; the input is untouched.

    `levels` resolves named values and units: {"q99": ..., "q01": ..., "median": ..., "sd": std,
    ...}, each (K,) or (B, K) (`patronus.interpret.stats.edit_levels`).
    Differentiable in s (training holds prototypes through it).
    """
    s = s.clone()
    for e in edits:
        value = _resolve(e, s, levels)
        if e.op == "set":
            target = value
        elif e.op == "scale":
            target = s[:, e.prototype] * value
        elif e.op == "add":
            target = s[:, e.prototype] + value
        else:
            raise ValueError(f"edit op {e.op!r}; expected set, scale or add")
        s[:, e.prototype] = target.clamp_min(0)  # log-similarity is never negative
    return s


def follow_correlations(s: torch.Tensor, s_edit: torch.Tensor, edited: Sequence[int], cov: torch.Tensor) -> torch.Tensor:
    """`s_edit` with every prototype outside `edited` moved by its linear regression on the edited
    ones over real data: Δs_O = Δs_E Σ_EE⁻¹ Σ_EO, the change of the conditional mean E[s_O | s_E]
    of a Gaussian fit to the data's activations (covariance `cov`, (K, K)); clamped at 0.

    Why: prototypes co-vary (the strokes of one digit, the parts of one face). An edit that sets one
    prototype alone asks for an `s` unlike any real image's, and a generator trained on real `s`
    reads it as mostly the unedited image (docs/sampling.md, "Correlated edits"; measured in docs/benchmarks.md). The
    edited prototypes keep exactly their requested values."""
    idx = sorted({int(j) for j in edited})
    K = s.shape[-1]
    if cov.shape != (K, K):
        raise ValueError(f"cov: expected ({K}, {K}) for K={K} prototypes, got {tuple(cov.shape)}")
    if not idx:
        return s_edit
    c = cov.to(device=s.device, dtype=torch.float64)
    others = torch.ones(K, dtype=torch.bool, device=s.device)
    others[idx] = False
    delta_e = (s_edit[:, idx] - s[:, idx]).double()  # (B, |E|)
    ridge = 1e-6 * c.diagonal().mean().clamp_min(1e-12) * torch.eye(len(idx), dtype=c.dtype, device=c.device)
    coef = torch.linalg.solve(c[idx][:, idx] + ridge, c[idx][:, others])  # (|E|, |O|) = Σ_EE⁻¹ Σ_EO
    out = s_edit.clone()
    out[:, others] = (s_edit[:, others].double() + delta_e @ coef).clamp_min(0).to(s_edit.dtype)
    return out


# How much nearer the requested values a neighbour must be on the edited prototypes than to the
# reference on each other one (standardised distances): the neighbours have what the edit asks for.
EDITED_WEIGHT = 100.0
NEIGHBOURS = 32  # real activations averaged by `follow_neighbours` (fewer if the bank is smaller)


def follow_neighbours(
    s: torch.Tensor, s_edit: torch.Tensor, edited: Sequence[int], bank: torch.Tensor, k: int = NEIGHBOURS
) -> torch.Tensor:
    """`s_edit` with every prototype outside `edited` set to its mean over the k real activations in
    `bank` (N, K) nearest the edit: near the requested values on the edited prototypes and near the
    reference `s` on the others (each prototype standardised by its spread over `bank`, the edited
    ones weighted `EDITED_WEIGHT`). A local, non-linear E[s_O | s_E = requested, like the reference].

    Why: `follow_correlations` moves the others along one global linear regression, and the further
    the generator is trained the less it follows such a made-up s (docs/benchmarks.md, "Edits"); the
    mean of real images that have the requested activation is followed further, and the more so the
    better the generator. The edited prototypes keep exactly their requested values."""
    idx = sorted({int(j) for j in edited})
    K = s.shape[-1]
    if bank.ndim != 2 or bank.shape[1] != K or len(bank) == 0:
        raise ValueError(f"bank: expected real activations (N, {K}) for K={K} prototypes, got {tuple(bank.shape)}")
    if not idx:
        return s_edit
    bank = bank.to(device=s.device, dtype=torch.float32)
    weight = torch.ones(K, device=s.device)
    weight[idx] = EDITED_WEIGHT
    scale = weight.sqrt() / bank.std(0).clamp_min(1e-8) if len(bank) > 1 else weight.sqrt()
    query = s.float().clone()
    query[:, idx] = s_edit[:, idx].float()
    nearest = torch.cdist(query * scale, bank * scale).topk(min(k, len(bank)), largest=False).indices  # (B, k)
    out = bank[nearest].mean(1).to(s_edit.dtype)
    out[:, idx] = s_edit[:, idx]
    return out


# What each coupling of the other prototypes reads from `levels` (`patronus.interpret.stats.edit_levels`).
COUPLING_NEEDS = {"correlated": "cov", "neighbours": "activations"}


def check_coupling(coupling: str, levels: Optional[Mapping[str, torch.Tensor]]) -> None:
    """A clear error for an unknown coupling, or one whose real-data input is missing from `levels`."""
    if coupling != "alone" and coupling not in COUPLING_NEEDS:
        raise ValueError(f"coupling={coupling!r}; expected 'alone', 'correlated' or 'neighbours'")
    needs = COUPLING_NEEDS.get(coupling)
    if needs and (levels is None or needs not in levels):
        raise ValueError(
            f"coupling={coupling!r} needs the real images' {needs!r}: pass levels=edit_levels(activation_statistics("
            "s_real, keep_activations=True)) (patronus.interpret.stats) computed on real images, or coupling='alone'"
        )


def couple(
    s: torch.Tensor,
    s_edit: torch.Tensor,
    edited: Sequence[int],
    coupling: str,
    levels: Optional[Mapping[str, torch.Tensor]] = None,
    k: int = NEIGHBOURS,
) -> torch.Tensor:
    """`s_edit` with the prototypes outside `edited` moved as `coupling` says: "alone" (not at all),
    "correlated" (`follow_correlations`, with levels["cov"]) or "neighbours" (`follow_neighbours`
    with k of levels["activations"])."""
    check_coupling(coupling, levels)
    if coupling == "alone":
        return s_edit
    if coupling == "correlated":
        return follow_correlations(s, s_edit, edited, levels["cov"])
    return follow_neighbours(s, s_edit, edited, levels["activations"], k)


def set_prototypes(s: torch.Tensor, prototypes: Sequence[int], values: Union[torch.Tensor, float]) -> torch.Tensor:
    """s with every prototype in `prototypes` set to its entry of `values` ((K,), (B, K) or a number):
    "s_J := baseline" for one or several J (information baselines, mitigation, held prototypes)."""
    if not isinstance(values, torch.Tensor):
        return apply_edits(s, [Edit(j, "set", float(values)) for j in prototypes])
    return apply_edits(s, [Edit(j, "set", values[..., j]) for j in prototypes])


def hold_prototypes(s: torch.Tensor, held: Mapping[int, float]) -> torch.Tensor:
    """s with each prototype of `held` ({J: value}) set to its value: a finding held at its neutral
    value (shortcut fine-tuning in training, its re-measurement in benchmarks)."""
    return apply_edits(s, [Edit(int(j), "set", float(v)) for j, v in held.items()])


def one_edit_each(s: torch.Tensor, prototypes: Sequence[int], values: torch.Tensor) -> torch.Tensor:
    """(P, B, K): for each J in `prototypes`, s with only s_J set to values[J] ((K,) or (B, K))."""
    return torch.stack([set_prototypes(s, [j], values) for j in prototypes]) if len(prototypes) else s.new_zeros(0, *s.shape)


def activation_range(activations: torch.Tensor, low: float = 0.01, high: float = 0.99) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prototype q01 and q99 of activations (N, K): robust low and high levels rather than one outlier."""
    q = torch.quantile(activations.float(), torch.tensor([low, high]), dim=0)
    return q[0], q[1]


def most_variable_prototypes(activations: torch.Tensor, n: int) -> list[int]:
    """The n prototypes whose activation varies most over a dataset: the ones worth editing first."""
    return activations.float().std(dim=0).argsort(descending=True)[:n].tolist()
