"""Export/load round trips, and loading that never unpickles arbitrary objects."""

import json

import pytest
import torch

from patronus.models.patronus import PatronusModel
from patronus.runs import export_model, load_model
from tests.conftest import TINY_NET


def _same_outputs(a: PatronusModel, b: PatronusModel) -> bool:
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        s = a.encode(x)
        return torch.equal(s, b.encode(x)) and torch.equal(a(x, torch.tensor([5, 500]), s=s), b(x, torch.tensor([5, 500]), s=s))


def test_export_round_trip_is_exact(tmp_path):
    net = PatronusModel(**TINY_NET).eval()
    out = export_model(net, tmp_path / "model")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert _same_outputs(net, load_model(out))
    export_model(net, tmp_path / "model")  # overwriting an export swaps directories, leaves no temp behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_unknown_config_field_is_named(tmp_path):
    out = export_model(PatronusModel(**TINY_NET), tmp_path / "model")
    cfg = json.loads((out / "config.json").read_text())
    cfg["num_protoypes"] = 3
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config.json: unknown fields \['num_protoypes'\]"):
        load_model(out)


@pytest.mark.parametrize("key, kept, other", [("condition_mode", "add", "scale_shift"), ("dropout", 0.0, 0.1)])
def test_models_saved_before_an_option_was_retired_still_load(tmp_path, key, kept, other):
    """condition_mode and dropout were removed (only "add" / 0.0 remain): an export that says so loads as it
    was trained; one that used the removed path is refused by name, never loaded into the wrong network."""
    net = PatronusModel(**TINY_NET).eval()
    out = export_model(net, tmp_path / "model")
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, key: kept}))
    assert _same_outputs(net, load_model(out))
    (out / "config.json").write_text(json.dumps({**cfg, key: other}))
    with pytest.raises(ValueError, match=f"{key} was removed"):
        load_model(out)


class Boom:
    def __reduce__(self):
        return (exec, ("raise SystemExit('arbitrary code ran')",))


def test_pickled_objects_in_a_checkpoint_are_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"net_config": dict(TINY_NET), "state_dict": {}, "payload": Boom()}, path)
    with pytest.raises(ValueError, match="weights_only"):
        load_model(path)


def test_missing_checkpoint_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        load_model(tmp_path / "nothing-here")
    with pytest.raises(FileNotFoundError, match="expected a run directory"):
        load_model(tmp_path)
