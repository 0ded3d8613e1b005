"""Loading tensor files safely, in one place: nothing is ever unpickled, and every refusal is one line
that names the file and never repeats torch's advice to retry with `weights_only=False` (a user must
never follow it for a file they did not make). Below models/ and runs.py, so both can use it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch


def load_reason(e: BaseException) -> str:
    """The useful part of torch.load's error, WITHOUT its advice to retry unsafely."""
    msg = str(e)
    if "WeightsUnpickler error:" in msg:
        msg = msg.split("WeightsUnpickler error:", 1)[1].split(". Please use", 1)[0].strip()
        return f"it holds objects a safe load refuses ({msg})"
    if "central directory" in msg or "zip archive" in msg or "_use_new_zipfile_serialization" in msg:
        return "truncated or not a torch checkpoint (incomplete zip archive)"
    msg = msg.strip().splitlines()[0] if msg.strip() else type(e).__name__
    return re.sub(r"\s*Re-running `torch.load`.*", "", msg)


def load_torch_file(path: str | Path, what: str = "checkpoint", mmap: bool = False) -> Any:
    """`torch.load(weights_only=True)` with one-line errors that name the file and never suggest an unsafe load."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: no such file")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as e:  # mmap needs the zip format: an old-format file is read whole
            if not (mmap and "_use_new_zipfile_serialization" in str(e)):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure becomes one line naming the file
        raise ValueError(f"{path}: not a readable {what}: {load_reason(e)}") from None


def load_state_dict_file(path: str | Path, what: str = "weights file") -> dict[str, torch.Tensor]:
    """A state dict of tensors from `.safetensors` or a torch file (loaded as above); anything else,
    or a file that is not a flat name -> tensor mapping, is refused with the file named."""
    path = Path(path)
    if path.suffix != ".safetensors":
        state = load_torch_file(path, what)
    else:
        if not path.is_file():
            raise FileNotFoundError(f"{what} {path}: no such file")
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(path)
        except (SafetensorError, OSError, ValueError) as e:  # e.g. HeaderTooLarge for a truncated file
            raise ValueError(f"{path}: not a readable {what}: {str(e).strip() or type(e).__name__}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a {what}: expected a state dict of tensors, got {type(state).__name__}")
    return state
