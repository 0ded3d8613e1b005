"""Bad inputs end with one line naming the file or field and what was expected; nothing on disk is lost.
Images of any bit depth are read at their true intensity (real 16-bit PNG files written here)."""

import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from patronus.cli.train import train_main
from patronus.data.datasets import image_folder
from patronus.data.folders import attribute_folder
from patronus.data.images import Intensity, read_image
from patronus.data.medmnist import medmnist
from patronus.data.registry import build_dataset
from patronus.interpret.generation_metrics import checked_inception_weights
from patronus.models.patronus import PatronusModel
from patronus.models.prototypes import PrototypeEncoder
from patronus.runs import export_model, load_model
from patronus.training.module import PatronusModule
from tests.conftest import REPO, TINY_NET

TINY = str(REPO / "configs" / "mnist_tiny.yaml")


def png16(path: Path, values: np.ndarray, significant_bits: int | None = None) -> Path:
    """A real 16-bit greyscale PNG, optionally with an sBIT chunk (as DICOM exporters write for 12-bit data)."""
    info = PngImagePlugin.PngInfo()
    if significant_bits:
        info.add(b"sBIT", bytes([significant_bits]))
    Image.fromarray(values.astype(np.uint16)).save(path, pnginfo=info)
    return path


def snapshot(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# Images of any bit depth -------------------------------------------------------------------------


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    f = png16(tmp_path / "x.png", np.array([[0, 200, 32768, 65535]] * 4))
    assert Image.open(f).mode.startswith("I;16")  # really 16-bit on disk
    x = read_image(f, 1)[0, 0]
    assert x.tolist() == pytest.approx([-1.0, 200 / 65535 * 2 - 1, 32768 / 65535 * 2 - 1, 1.0], abs=1e-6)
    rgb = read_image(f, 3)  # grey -> 3 channels for an RGB model
    assert rgb.shape == (3, 4, 4) and torch.equal(rgb[0], rgb[2])


def test_dicom_style_12_bit_png_spans_the_full_range(tmp_path):
    ramp = np.linspace(0, 4095, 16).round().reshape(4, 4)
    x = read_image(png16(tmp_path / "xray.png", ramp, significant_bits=12), 1, resize_to=4)
    assert float(x.min()) == pytest.approx(-1) and float(x.max()) == pytest.approx(1)  # as a DICOM viewer shows it
    ds = image_folder(str(tmp_path.parent), tmp_path.name, 4, channels=1)  # and through a dataset
    assert torch.allclose(ds[0]["image"], x)


def test_32_bit_integer_and_float_tiffs(tmp_path):
    Image.fromarray(np.array([[-(2**31), 0, 2**31 - 1]] * 3, np.int32)).save(tmp_path / "i.tif")
    assert read_image(tmp_path / "i.tif", 1)[0, 0].tolist() == pytest.approx([-1, 0, 1], abs=1e-6)
    Image.fromarray(np.array([[0.0, 0.25, 1.0]] * 3, np.float32)).save(tmp_path / "f.tif")
    assert read_image(tmp_path / "f.tif", 1)[0, 0].tolist() == pytest.approx([-1, -0.5, 1])
    Image.fromarray(np.array([[0.0, np.nan, 1.0]] * 3, np.float32)).save(tmp_path / "nan.tif")
    with pytest.raises(ValueError, match=r"nan\.tif: 3 pixel\(s\) are NaN or infinite"):
        read_image(tmp_path / "nan.tif", 1)
    Image.fromarray(np.array([[0.0, 300.0]] * 2, np.float32)).save(tmp_path / "hu.tif")
    with pytest.raises(ValueError, match=r"hu\.tif: float pixels range over \[0, 300\]; expected float images in \[0, 1\]"):
        read_image(tmp_path / "hu.tif", 1)


def xray_folder(root: Path, top: int = 4095) -> Path:
    """ROOT/train with two 16-bit PNGs holding 12-bit data and NO sBIT chunk, as most DICOM exporters write."""
    (root / "train").mkdir(parents=True)
    for i in range(2):
        png16(root / "train" / f"{i}.png", np.linspace(0, top, 16).round().reshape(4, 4))
    return root / "train"


@pytest.mark.parametrize("builder", [image_folder, attribute_folder], ids=["image_folder", "attribute_folder"])
def test_12_bit_data_without_sbit_warns_and_bit_depth_reads_it_as_it_looks(tmp_path, builder):
    folder = xray_folder(tmp_path)
    with pytest.warns(UserWarning, match=re.escape(str(folder)) + r": .*reach at most 4095 of 65535.*set bit_depth: 12"):
        dark = builder(str(tmp_path), "train", 4, channels=1)[0]["image"]
    assert float(dark.max()) < -0.85  # what the warning is about: nearly black
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the stated depth silences the warning
        ds = builder(str(tmp_path), "train", 4, channels=1, bit_depth=12)
        x = ds[0]["image"]
        assert float(x.min()) == pytest.approx(-1) and float(x.max()) == pytest.approx(1)
        flipped = builder(str(tmp_path), "train", 4, channels=1, bit_depth=12, invert=True)[0]["image"]  # MONOCHROME1
    assert torch.allclose(flipped, -x) and float(flipped[0, 0, 0]) == pytest.approx(1)  # 0 is white there


def test_sample_reads_image_files_at_the_runs_bit_depth(tmp_path):
    """`sample.py --images` reads files as the run read its data (data.options bit_depth / invert)."""
    import yaml

    from patronus.cli.sample import main as sample_main

    folder = tmp_path / "xrays" / "train"
    folder.mkdir(parents=True)
    ramp = np.linspace(0, 4095, 32 * 32).round().reshape(32, 32)  # 12-bit values in a 16-bit PNG, no sBIT
    xray = png16(folder / "0.png", ramp)
    png16(folder / "1.png", ramp[::-1])
    run = tmp_path / "run"
    export_model(PatronusModel(**TINY_NET), run / "model")

    def reference_tile(options: dict, out: str) -> np.ndarray:
        data = {"dataset": "image_folder", "root": str(tmp_path / "xrays"), "val_split": "train", "options": options}
        (run / "config.yaml").write_text(yaml.safe_dump({"data": data}))
        shutil.rmtree(run / "analysis", ignore_errors=True)  # statistics cached per source
        summary = sample_main(
            [
                "--checkpoint",
                str(run),
                "--images",
                json.dumps([str(xray)]),
                "--out",
                str(tmp_path / out),
                "--device",
                "cpu",
                "--steps",
                "2",
                "--edit_steps",
                "2",
                "--num_samples",
                "1",
                "--edit_top",
                "1",
            ]
        )
        grid = np.asarray(Image.open(summary["files"]["samples"]).convert("L"))
        return grid[1:33, 1:33]  # row 1, column 1: the reference as it was read (make_grid padding 1)

    with pytest.warns(UserWarning, match="set bit_depth: 12"):  # the dataset warns; the image file was read the same way
        assert reference_tile({}, "as_stored").max() <= 16  # 4095 of 65535: nearly black
    bright = reference_tile({"bit_depth": 12}, "bit_depth")
    assert bright.min() == 0 and bright.max() == 255  # 0..4095 spans black to white, as in training
    flipped = reference_tile({"bit_depth": 12, "invert": True}, "invert")
    assert flipped[0, 0] == 255 and flipped[-1, -1] == 0
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"options": {"bit_depth": "12"}}}))
    with pytest.raises(SystemExit):
        sample_main(["--checkpoint", str(run), "--images", json.dumps([str(xray)]), "--out", str(tmp_path / "bad"), "--device", "cpu"])


def test_full_range_16_bit_data_does_not_warn(tmp_path):
    xray_folder(tmp_path, top=65535)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image_folder(str(tmp_path), "train", 4, channels=1)


def test_values_above_the_stated_bit_depth_name_the_file(tmp_path):
    folder = xray_folder(tmp_path)
    bad = png16(folder / "1.png", np.full((4, 4), 4096))
    msg = re.escape(str(bad)) + r": pixel value 4096 is above 4095, the largest 12-bit value \(bit_depth=12\)"
    ds = image_folder(str(tmp_path), "train", 4, channels=1, bit_depth=12)  # header check: found when read
    with pytest.raises(ValueError, match=msg):
        ds[1]
    with pytest.raises(ValueError, match=msg):  # or up front
        image_folder(str(tmp_path), "train", 4, channels=1, bit_depth=12, verify="decode")
    with pytest.raises(ValueError, match=r"bit_depth='12'; expected the bits stored per pixel, an integer 1\.\.32"):
        build_dataset("image_folder", str(tmp_path), "train", 4, channels=1, bit_depth="12")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(folder / "8bit.png")
    with pytest.raises(ValueError, match=r"8bit\.png: holds 8-bit pixels, fewer than bit_depth=12"):
        read_image(folder / "8bit.png", 1, intensity=Intensity(bit_depth=12))


# Every dataset checks its files up front ---------------------------------------------------------


def folder_with_truncated_jpeg(root: Path) -> Path:
    for i, cls in enumerate(["a", "b", "b"]):
        (root / "train" / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64, 3), np.uint8)).save(root / "train" / cls / f"{i}.jpg")
    bad = root / "train" / "b" / "2.jpg"
    bad.write_bytes(bad.read_bytes()[:2000])  # header fine, body cut: only a decode finds it
    return bad


@pytest.mark.parametrize("builder", [image_folder, attribute_folder], ids=["image_folder", "attribute_folder"])
def test_truncated_jpeg_body_is_found_up_front_when_asked(tmp_path, builder):
    bad = folder_with_truncated_jpeg(tmp_path)
    before = snapshot(tmp_path)
    assert len(builder(str(tmp_path), "train", 16, channels=3)) == 3  # header check only: passes
    with pytest.raises(ValueError, match=re.escape(str(bad)) + r": cannot decode image .*truncated"):
        builder(str(tmp_path), "train", 16, channels=3, verify="decode")
    with pytest.warns(UserWarning, match=r"skipped 1 of 3 .*2\.jpg"):
        ds = builder(str(tmp_path), "train", 16, channels=3, verify="decode", on_error="skip")
    assert len(ds) == 2 and all(ds[i]["image"].shape == (3, 16, 16) for i in range(2))
    assert snapshot(tmp_path) == before  # skipping never touches the files


def test_image_folder_has_on_error_and_names_bad_values(tmp_path):
    folder_with_truncated_jpeg(tmp_path)
    (tmp_path / "train" / "a" / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"notes\.png: cannot open image"):
        image_folder(str(tmp_path), "train", 16)
    with pytest.raises(ValueError, match=r"on_error='ignore'; expected 'raise' or 'skip'"):
        image_folder(str(tmp_path), "train", 16, on_error="ignore")
    with pytest.raises(ValueError, match=r"verify='full'; expected 'header'"):
        image_folder(str(tmp_path), "train", 16, verify="full")
    for f in (tmp_path / "train").rglob("*.jpg"):
        f.write_bytes(b"")
    with pytest.raises(ValueError, match=r"all 4 image files are bad, nothing is left"):
        image_folder(str(tmp_path), "train", 16, on_error="skip")


def test_bad_gz_in_mnist_folder_is_named(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    shutil.copytree(REPO / "data" / "MNIST" / "raw", raw)
    bad = raw / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:5000])
    with pytest.raises(ValueError, match=re.escape(str(bad)) + r": cannot decompress it \(corrupt or truncated \.gz"):
        build_dataset("mnist", str(tmp_path), "test", 32)
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=re.escape(str(bad)) + r": cannot decompress"):
        build_dataset("mnist", str(tmp_path), "test", 32)


def test_npz_with_every_row_skipped_says_so(tmp_path):
    np.savez(tmp_path / "pneumoniamnist.npz", train_images=np.zeros((3, 28, 28), np.uint8), train_labels=np.array([[7], [9], [-1]]))
    with pytest.raises(ValueError, match=r"pneumoniamnist\.npz: all 3 rows of train_labels are bad .*nothing is left"):
        medmnist(str(tmp_path), "train", 28, on_error="skip")


# Config and model files --------------------------------------------------------------------------


def test_bad_config_json_is_named(tmp_path):
    out = export_model(PatronusModel(**TINY_NET), tmp_path / "model")
    cfg = out / "config.json"
    good = json.loads(cfg.read_text())
    cfg.write_text(json.dumps({**good, "num_prototypes": "eight"}))
    with pytest.raises(ValueError, match=r"config\.json: .*num_prototypes='eight'; expected an integer >= 1"):
        load_model(out)
    cfg.write_text(json.dumps(good)[:40])
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        load_model(out)


@pytest.mark.parametrize("value", ["0", "-3"])
def test_num_prototypes_must_be_positive(value, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        train_main(["--config", TINY, "--run_dir", str(tmp_path / "run"), "--logger", "none", "--model.net.num_prototypes", value])
    assert e.value.code == 2
    assert f"model.net.num_prototypes={value}; expected an integer >= 1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_yaml_syntax_error_names_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  lr: [1e-3\ntrainer:\n  max_steps: 3\n")
    with pytest.raises(SystemExit) as e:
        train_main(["--config", str(bad)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and re.match(rf"error: --config {re.escape(str(bad))}: not valid YAML at line \d+", err[-1])


def test_data_follows_the_model_and_mismatches_are_named(tmp_path, capsys):
    code = None
    try:
        train_main(
            [
                "--config",
                TINY,
                "--run_dir",
                str(tmp_path / "run"),
                "--logger",
                "none",
                "--data.root",
                str(REPO / "data"),
                "--model.net.in_channels",
                "3",
                "--trainer.max_steps",
                "1",
            ]
        )
    except SystemExit as e:
        code = e.code
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "gives 1-channel 32x32 images, but the model expects model.net.in_channels=3" in line
    from patronus.cli.train import PatronusCLI

    cli = PatronusCLI(
        args=[
            "--config",
            TINY,
            "--logger",
            "none",
            "--run_dir",
            str(tmp_path / "r2"),
            "--model.net.image_size",
            "16",
            "--model.net.in_channels",
            "1",
        ]
    )
    assert cli.datamodule.hparams.image_size == 16 and cli.datamodule.hparams.channels == 1  # linked, never disagree


def test_init_from_errors_name_the_option(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^model\.init_from=.*nowhere: checkpoint .*nowhere: no such file"):
        PatronusModule(PatronusModel(**TINY_NET), init_from=str(tmp_path / "nowhere"))
    other = export_model(PatronusModel(**{**TINY_NET, "num_prototypes": 4}), tmp_path / "other")
    with pytest.raises(ValueError, match=r"^model\.init_from=.*other: a different architecture .*num_prototypes: 4 there, 8 here"):
        PatronusModule(PatronusModel(**TINY_NET), init_from=str(other))


def test_fid_inception_weights_are_checked_before_sampling(tmp_path):
    bogus = tmp_path / "pt_inception.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1)}, bogus)  # right key, not a network
    with pytest.raises(ValueError, match=r"^inception_weights .*pt_inception\.pth: cannot build the FID InceptionV3"):
        checked_inception_weights(str(bogus))
    bogus.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"^inception_weights .*pt_inception\.pth: not a readable") as e:
        checked_inception_weights(str(bogus))
    assert "False" not in str(e.value)


class Payload:
    def __reduce__(self):
        return (exec, ("raise SystemExit('arbitrary code ran')",))


def test_bad_backbone_weights_name_the_file_without_unsafe_advice(tmp_path):
    evil = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": Payload()}, evil)
    cut = tmp_path / "cut.pth"
    torch.save({"conv1.weight": torch.zeros(8)}, cut)
    cut.write_bytes(cut.read_bytes()[:100])
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"garbage")
    for bad, why in [(evil, "objects a safe load refuses"), (cut, "truncated"), (broken, "header")]:
        with pytest.raises(ValueError, match=re.escape(str(bad)) + r": not a readable backbone_weights file: .*" + why) as e:
            PrototypeEncoder(in_channels=1, image_size=32, num_prototypes=4, backbone="resnet10t", backbone_weights=str(bad))
        assert "weights_only" not in str(e.value) and "False" not in str(e.value)
    torch.save({"epoch": 3}, evil)
    with pytest.raises(ValueError, match=re.escape(str(evil)) + r": not a backbone_weights file: expected a state dict of tensors"):
        PrototypeEncoder(in_channels=1, image_size=32, num_prototypes=4, backbone="resnet10t", backbone_weights=str(evil))
