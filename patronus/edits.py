"""The one way to change prototype activations: set / scale / add, one or several prototypes at once.

Every caller that changes a prototype's value (sample.py's edits, the analyses' raise/suppress
and baselines, the shortcut report's causal check and mitigation, training with held
prototypes) goes through `apply_edits`, so "edit" means the same thing everywhere: log-
similarities are clamped at 0 and every other prototype is left bit-for-bit untouched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Mapping, Optional, Sequence, Union

import torch

Op = Literal["set", "scale", "add"]
# A number, a named level resolved from `levels` ("max", "min", "median", ...), or a tensor of
# per-image values (B,) / one value (): what an edit sets, multiplies by or adds.
Value = Union[float, str, torch.Tensor]
_SPEC = re.compile(r"^\s*(\d+)\s*(=|\*|\+|-)\s*(max|min|median|[0-9.eE+-]+)\s*$")


@dataclass(frozen=True)
class Edit:
    """One change to prototype `prototype`: set to / multiply by / add `value`."""

    prototype: int
    op: Op
    value: Value

    def __str__(self) -> str:
        sym = {"set": "=", "scale": "*", "add": "+"}[self.op]
        value = self.value
        if isinstance(value, torch.Tensor):
            value = f"{float(value.float().mean()):.4g}" if value.numel() else "[]"
        return f"{self.prototype}{sym}{value}"


def parse_edit(spec: str, num_prototypes: int) -> list[Edit]:
    """'3=max' | '7=0' | '5*2' | '2+1.5' | '4-0.5', comma-joined for one combined edit ('3=max,7=min')."""
    edits = []
    for part in spec.split(","):
        m = _SPEC.match(part)
        if not m:
            raise ValueError(
                f"edit {spec!r}: cannot parse {part!r}; expected J=VALUE, J*FACTOR, J+DELTA or J-DELTA "
                "with VALUE a number, 'max', 'min' or 'median' (e.g. 3=max,7=0)"
            )
        j, sym, raw = int(m.group(1)), m.group(2), m.group(3)
        if not 0 <= j < num_prototypes:
            raise ValueError(f"edit {spec!r}: prototype {j} does not exist; the model has K={num_prototypes} (0..{num_prototypes - 1})")
        if raw in ("max", "min", "median"):
            if sym != "=":
                raise ValueError(f"edit {spec!r}: '{raw}' only works with '=' (got {sym!r})")
            value: Value = raw
        else:
            try:
                value = float(raw)
            except ValueError:
                raise ValueError(f"edit {spec!r}: {raw!r} is not a number") from None
        op: Op = {"=": "set", "*": "scale", "+": "add", "-": "add"}[sym]
        if sym == "-":
            value = -float(value)
        edits.append(Edit(j, op, value))
    return edits


def _resolve(value: Value, j: int, s: torch.Tensor, levels: Optional[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """The value of an edit of prototype j as a (B,) tensor on s's device."""
    if isinstance(value, str):
        if not levels or value not in levels:
            raise ValueError(f"edit value {value!r} needs activation statistics with {value!r} (levels={sorted(levels or {})})")
        level = levels[value].to(s)
        return (level[..., j] if level.ndim else level).expand(len(s))
    if isinstance(value, torch.Tensor):
        return value.to(s).expand(len(s))
    return torch.full((len(s),), float(value), dtype=s.dtype, device=s.device)


def apply_edits(s: torch.Tensor, edits: Sequence[Edit], levels: Optional[Mapping[str, torch.Tensor]] = None) -> torch.Tensor:
    """New activations (B, K) with every edit applied in order; the input is untouched.

    `levels` resolves named values: {"max": q99, "min": q01, "median": q50, ...}, each (K,) or (B, K).
    Differentiable in s (training holds prototypes through it).
    """
    s = s.clone()
    for e in edits:
        value = _resolve(e.value, e.prototype, s, levels)
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


def set_prototypes(s: torch.Tensor, prototypes: Sequence[int], values: Union[torch.Tensor, float]) -> torch.Tensor:
    """s with every prototype in `prototypes` set to its entry of `values` ((K,), (B, K) or a number):
    "s_J := baseline" for one or several J (information baselines, mitigation, held prototypes)."""
    if not isinstance(values, torch.Tensor):
        return apply_edits(s, [Edit(j, "set", float(values)) for j in prototypes])
    return apply_edits(s, [Edit(j, "set", values[..., j]) for j in prototypes])


def one_edit_each(s: torch.Tensor, prototypes: Sequence[int], values: torch.Tensor) -> torch.Tensor:
    """(P, B, K): for each J in `prototypes`, s with only s_J set to values[J] ((K,) or (B, K))."""
    return torch.stack([set_prototypes(s, [j], values) for j in prototypes]) if len(prototypes) else s.new_zeros(0, *s.shape)


@torch.no_grad()
def activation_range(activations: torch.Tensor, low: float = 0.01, high: float = 0.99) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prototype quantiles of activations (N, K): robust 'min'/'max' rather than one outlier."""
    q = torch.quantile(activations.float(), torch.tensor([low, high]), dim=0)
    return q[0], q[1]


def most_variable_prototypes(activations: torch.Tensor, n: int) -> list[int]:
    """The n prototypes whose activation varies most over a dataset: the ones worth editing first."""
    return activations.float().std(dim=0).argsort(descending=True)[:n].tolist()
