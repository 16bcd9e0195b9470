"""`resnet predict`: saved class names and view, batching, per-file failures that do not stop the rest."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resnet import UserError, create_model
from resnet.artifacts import save_model_artifacts
from resnet.cli import main
from resnet.inference import InferenceModel
from resnet.loading import load_model
from resnet.predict import find_images, predict_files, prepare

CLASSES = ["zebra", "ant", "moth"]


def colour_model(out: Path) -> Path:
    """A model that ranks the classes by the mean of one colour channel each: zebra = red, ant = green,
    moth = blue (a rigged fc over pooled features would need training; this is exact)."""
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=3).eval()
    model.fc.weight.data.zero_()
    model.fc.bias.data = torch.tensor([3.0, 2.0, 1.0])  # zebra > ant > moth on every image
    out.mkdir(parents=True, exist_ok=True)
    save_model_artifacts(out, model, {"arch": "resnet20", "options": {"num_classes": 3}, "classes": CLASSES,
                                      "mean": [0.5] * 3, "std": [0.25] * 3, "input_size": [3, 16, 16],
                                      "eval_view": "full"})
    return out


def images(root: Path) -> Path:
    rng = np.random.default_rng(0)
    (root / "sub").mkdir(parents=True)
    for name, size in (("a.png", (16, 16)), ("b.jpg", (40, 24)), ("sub/c.png", (16, 16))):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / name)
    Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(root / "gray.png")  # 1 channel
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    # 2 x 300: resized by its shorter side to the model's 16 it would be 16 x 2400; at ImageNet's 256 a
    # 1 x 80,000 strip would need 60 GB. Refused per file like a broken one.
    Image.fromarray(rng.integers(0, 255, (2, 300, 3), dtype=np.uint8)).save(root / "strip.png")
    (root / "notes.txt").write_text("not an image name, not picked up from a folder")
    return root


def test_predict_json_reports_bad_files_and_continues(tmp_path, capsys):
    run = colour_model(tmp_path / "run")
    folder = images(tmp_path / "imgs")
    rc = main(["predict", str(run), str(folder), str(tmp_path / "missing.png"), "--topk", "2", "--format", "json",
               "--batch-size", "2"])
    assert rc == 1  # some files failed
    captured = capsys.readouterr()
    results = json.loads(captured.out)
    by_name = {Path(r["path"]).name: r for r in results}
    assert set(by_name) == {"a.png", "b.jpg", "c.png", "gray.png", "broken.jpg", "strip.png", "missing.png"}
    for name in ("a.png", "b.jpg", "c.png", "gray.png"):
        preds = by_name[name]["predictions"]
        assert [p["label"] for p in preds] == ["zebra", "ant"]
        assert preds[0]["prob"] == pytest.approx(float(torch.softmax(torch.tensor([3.0, 2, 1]), 0)[0]), abs=1e-5)
    assert "error" in by_name["broken.jpg"] and "predictions" not in by_name["broken.jpg"]
    assert "thinner than the 100:1" in by_name["strip.png"]["error"]
    assert "broken.jpg" in captured.err and "3 of 7 images failed" in captured.err


def test_predict_csv_and_table(tmp_path, capsys):
    run = colour_model(tmp_path / "run")
    folder = images(tmp_path / "imgs")
    assert main(["predict", str(run), str(folder / "a.png"), "--format", "csv", "--topk", "3"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["label"] for r in rows] == ["zebra", "ant", "moth"] and rows[0]["rank"] == "1"
    assert main(["predict", str(run), str(folder / "a.png")]) == 0
    assert "zebra" in capsys.readouterr().out


@pytest.mark.parametrize("flag, value", [("--topk", "0"), ("--batch-size", "0")])
def test_a_count_below_one_is_one_sentence(tmp_path, capsys, flag, value):
    run = colour_model(tmp_path / "run")
    folder = images(tmp_path / "imgs")
    assert main(["predict", str(run), str(folder / "a.png"), flag, value]) == 2
    assert f"{flag} must be at least 1" in capsys.readouterr().err


def test_batched_predictions_equal_one_by_one(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=3).eval()
    run = tmp_path / "run"
    run.mkdir()
    save_model_artifacts(run, model, {"arch": "resnet20", "options": {"num_classes": 3}, "classes": CLASSES,
                                      "mean": [0.5] * 3, "std": [0.25] * 3, "input_size": [3, 16, 16],
                                      "eval_view": "full"})
    model, meta = load_model(run)
    paths = find_images([str(images(tmp_path / "imgs"))])
    predictor = InferenceModel(model, meta, backend="torch")
    batched = predict_files(predictor, meta, paths, topk=3, batch_size=3)
    single = predict_files(predictor, meta, paths, topk=3, batch_size=1)
    for a, b in zip(batched, single, strict=True):
        assert a.get("error") == b.get("error")
        for p, q in zip(a.get("predictions", []), b.get("predictions", []), strict=True):
            assert p["label"] == q["label"] and p["prob"] == pytest.approx(q["prob"], abs=1e-5)


def test_prepare_uses_the_models_view_and_normalisation():
    meta = {"input_size": [3, 16, 16], "mean": [0.5] * 3, "std": [0.25] * 3, "eval_view": "full"}
    img = torch.full((3, 16, 16), 255, dtype=torch.uint8)
    assert torch.allclose(prepare(img, meta), torch.full((3, 16, 16), 2.0))  # (1 - 0.5) / 0.25
    big = torch.zeros((3, 50, 30), dtype=torch.uint8)
    assert prepare(big, meta).shape == (3, 16, 16)
    assert prepare(big, {**meta, "eval_view": "center"}).shape == (3, 16, 16)
    assert prepare(big, {**meta, "eval_view": "10crop"}).shape == (10, 3, 16, 16)
    ramp = torch.arange(16, dtype=torch.uint8).repeat(3, 16, 1)  # differs from its mirror image
    both = prepare(ramp, {**meta, "eval_view": "flip"})
    assert both.shape == (2, 3, 16, 16) and torch.equal(both[1], both[0].flip(-1))
    assert torch.equal(both[0], prepare(ramp, meta))


def test_no_images_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no image files found"):
        find_images([str(tmp_path)])


def test_a_folder_is_searched_through_linked_subfolders_once(tmp_path):
    # Photos often sit in a folder linked in from elsewhere; a link back up the tree must not loop.
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    Image.new("RGB", (4, 4)).save(outside / "b.png")
    top = tmp_path / "photos"
    top.mkdir()
    Image.new("RGB", (4, 4)).save(top / "a.png")
    (top / ".thumbs").mkdir()
    Image.new("RGB", (4, 4)).save(top / ".thumbs" / "a.png")
    (top / "linked").symlink_to(outside, target_is_directory=True)
    (top / "loop").symlink_to(top, target_is_directory=True)
    assert find_images([str(top)]) == [str(top / "a.png"), str(top / "linked" / "b.png")]


def test_an_unreadable_subfolder_is_reported_and_the_rest_predicted(tmp_path, monkeypatch, capsys):
    top = tmp_path / "photos"
    (top / "locked").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(top / "a.png")
    real_scandir = os.scandir

    def scandir(path):  # tests run as root, where chmod 000 does not lock a folder
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    problems: list[dict] = []
    assert find_images([str(top)], problems) == [str(top / "a.png")]
    assert problems == [{"path": str(top / "locked"), "error": "is a folder that cannot be read (Permission denied)"}]


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_a_file_name_that_is_not_utf8_is_printed_escaped_in_every_format(tmp_path, fmt):
    """Under a strict UTF-8 stdout (en_US.UTF-8) such a name used to end the output in a traceback."""
    import subprocess
    import sys

    run = colour_model(tmp_path / "run")
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(os.fsdecode(bytes(folder) + b"/caf\xe9.png"))
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(folder / "z.png")
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}
    proc = subprocess.run([sys.executable, "-m", "resnet", "predict", str(run), str(folder), "--format", fmt],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(r["path"] for r in json.loads(proc.stdout)) if fmt == "json" else proc.stdout
    assert "caf\\xe9.png" in text and "z.png" in text  # the name, escaped, and the files after it


def test_a_one_pixel_image_and_a_path_under_home_predict_without_warnings(tmp_path, monkeypatch, capsys):
    """A 1x1 image decoded to a read-only view, and PyTorch's warning about it reached the user; '~/x.png'
    quoted (so the shell left it alone) was reported missing."""
    import warnings

    from resnet.data.decode import to_array

    assert to_array(Image.new("RGB", (1, 1))).flags.writeable
    run = colour_model(tmp_path / "run")
    (tmp_path / "home").mkdir()
    Image.fromarray(np.full((1, 1, 3), 200, dtype=np.uint8)).save(tmp_path / "home" / "dot.png")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["predict", str(run), "~/dot.png", "--format", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [p["label"] for p in result[0]["predictions"]][:1] == ["zebra"]
