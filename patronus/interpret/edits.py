"""Prototype-guided editing of activation vectors: set / scale / add / suppress, one or several at once."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Union

import torch

Op = Literal["set", "scale", "add"]
_SPEC = re.compile(r"^\s*(\d+)\s*(=|\*|\+|-)\s*(max|min|[0-9.eE+-]+)\s*$")


@dataclass(frozen=True)
class Edit:
    """One change to prototype `prototype`: set to / multiply by / add `value` ('max'/'min' = dataset quantiles)."""

    prototype: int
    op: Op
    value: Union[float, Literal["max", "min"]]

    def __str__(self) -> str:
        sym = {"set": "=", "scale": "*", "add": "+"}[self.op]
        return f"{self.prototype}{sym}{self.value}"


def parse_edit(spec: str, num_prototypes: int) -> list[Edit]:
    """'3=max' | '7=0' | '5*2' | '2+1.5' | '4-0.5', comma-joined for one combined edit ('3=max,7=min')."""
    edits = []
    for part in spec.split(","):
        m = _SPEC.match(part)
        if not m:
            raise ValueError(
                f"--edit {spec!r}: cannot parse {part!r}; expected J=VALUE, J*FACTOR, J+DELTA or J-DELTA "
                "with VALUE a number, 'max' or 'min' (e.g. 3=max,7=0)"
            )
        j, sym, raw = int(m.group(1)), m.group(2), m.group(3)
        if not 0 <= j < num_prototypes:
            raise ValueError(f"--edit {spec!r}: prototype {j} does not exist; the model has K={num_prototypes} (0..{num_prototypes - 1})")
        if raw in ("max", "min"):
            if sym != "=":
                raise ValueError(f"--edit {spec!r}: 'max'/'min' only work with '=' (got {sym!r})")
            value: Union[float, str] = raw
        else:
            try:
                value = float(raw)
            except ValueError:
                raise ValueError(f"--edit {spec!r}: {raw!r} is not a number") from None
        op: Op = {"=": "set", "*": "scale", "+": "add", "-": "add"}[sym]
        if sym == "-":
            value = -float(value)
        edits.append(Edit(j, op, value))
    return edits


def apply_edits(s: torch.Tensor, edits: list[Edit], s_min: torch.Tensor, s_max: torch.Tensor) -> torch.Tensor:
    """New activations (B, K) with every edit applied; `s_min`/`s_max` (K,) resolve 'min'/'max'."""
    s = s.clone()
    for e in edits:
        if e.value == "max":
            target = s_max[e.prototype].expand(len(s))
        elif e.value == "min":
            target = s_min[e.prototype].expand(len(s))
        elif e.op == "set":
            target = torch.full_like(s[:, e.prototype], float(e.value))
        elif e.op == "scale":
            target = s[:, e.prototype] * float(e.value)
        else:
            target = s[:, e.prototype] + float(e.value)
        s[:, e.prototype] = target.clamp_min(0)  # log-similarity is never negative
    return s


@torch.no_grad()
def activation_range(activations: torch.Tensor, low: float = 0.01, high: float = 0.99) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prototype quantiles of activations (N, K): robust 'min'/'max' rather than one outlier."""
    q = torch.quantile(activations.float(), torch.tensor([low, high]), dim=0)
    return q[0], q[1]


def most_variable_prototypes(activations: torch.Tensor, n: int) -> list[int]:
    """The n prototypes whose activation varies most over a dataset: the ones worth editing first."""
    return activations.float().std(dim=0).argsort(descending=True)[:n].tolist()
