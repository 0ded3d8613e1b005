"""Presets instantiate; bad configs fail with messages that name the field."""

from pathlib import Path

import pytest
import yaml

from patronus.cli.train import PatronusCLI
from patronus.training.module import PatronusModule
from patronus.training.reseeding import PrototypeReseeding
from tests.conftest import REPO

PRESETS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_every_preset_instantiates(preset: Path, tmp_path):
    cli = PatronusCLI(args=["--config", str(preset), "--logger", "none", "--run_dir", str(tmp_path)])
    assert isinstance(cli.model, PatronusModule)
    wanted = yaml.safe_load(preset.read_text())["model"]["net"]
    for key, value in wanted.items():
        got = cli.model.net.config[key]
        assert (list(got) if isinstance(got, tuple) else got) == value, key
    assert cli.trainer.default_root_dir == str(tmp_path)
    assert cli.trainer.checkpoint_callback.dirpath == str(tmp_path / "checkpoints")
    # prototype reseeding is opt-in: only a preset with a reseed: block gets the callback, with its values
    assert None not in cli.trainer.callbacks  # a left-out optional callback must not reach the trainer
    reseed = [c for c in cli.trainer.callbacks if isinstance(c, PrototypeReseeding)]
    block = yaml.safe_load(preset.read_text()).get("reseed")
    assert [c.start for c in reseed] == ([block["start_step"]] if block else [])


def test_at_least_the_paper_and_cpu_presets_exist():
    names = {p.stem for p in PRESETS}
    assert {"mnist_cpu", "mnist_paper", "fashion_mnist_cpu", "fashion_mnist_paper"} <= names


def _fails(capsys, *args: str) -> str:
    with pytest.raises(SystemExit):
        PatronusCLI(args=["--logger", "none", *args])
    return capsys.readouterr().err


def test_unknown_preset_names_the_file(capsys):
    err = _fails(capsys, "--config", "configs/no_such_preset.yaml")
    assert "no_such_preset.yaml" in err


def test_bad_value_names_the_field(capsys, tmp_path):
    err = _fails(capsys, "--config", "configs/mnist_tiny.yaml", "--run_dir", str(tmp_path), "--model.net.num_prototypes", "many")
    assert "num_prototypes" in err and "int" in err


def test_unknown_field_is_named(capsys, tmp_path):
    err = _fails(capsys, "--config", "configs/mnist_tiny.yaml", "--run_dir", str(tmp_path), "--model.net.num_protoypes", "3")
    assert "num_protoypes" in err


def test_invalid_value_caught_by_the_constructor_names_it(capsys, tmp_path):
    err = _fails(capsys, "--config", "configs/mnist_tiny.yaml", "--run_dir", str(tmp_path), "--model.net.encoder_layout", "vgg")
    assert "vgg" in err and "paper32" in err
