"""`resnet data DATA`: the description a script reads (JSON), the table a person reads, and failures."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from resnet.cli import main


def _folder(root):
    for split, counts in (("train", {"cat": 3, "dog": 2}), ("val", {"cat": 1, "dog": 1})):
        for name, n in counts.items():
            d = root / split / name
            d.mkdir(parents=True)
            for k in range(n):
                Image.fromarray(np.full((5, 7, 3), 40 * k, np.uint8)).save(d / f"{k}.png")
    (root / "train" / "dog" / "broken.png").write_text("not an image")
    return root


def test_data_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RESNET_CACHE_DIR", str(tmp_path / "cache"))
    root = _folder(tmp_path / "d")
    assert main(["data", str(root), "--format", "json"]) == 0
    info = json.loads(capsys.readouterr().out)
    train, val = info["splits"]["train"], info["splits"]["val"]
    assert (train["n"], val["n"]) == (5, 2) and train["classes"] == ["cat", "dog"]
    assert train["class_counts"] == {"cat": 3, "dog": 2} and train["image_size"] == [5, 7]
    assert len(train["skipped"]) == 1 and train["skipped"][0]["path"].endswith("broken.png")
    assert "not an image" in train["skipped"][0]["reason"] and val["skipped"] == []
    assert info["kind"] == "memory" and len(info["mean"]) == 3


def test_data_table_and_carved_val(capsys):
    assert main(["data", "digits", "--val-size", "0.1", "--in-chans", "1"]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "1,293" in out and "144" in out and "8x8" in out and "1 channel" in out


def test_data_failures_exit_2_with_one_sentence(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RESNET_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["data", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("resnet data: the data folder") and err.count("\n") == 0
    root = _folder(tmp_path / "d")
    assert main(["data", str(root), "--strict"]) == 2
    assert "broken.png" in capsys.readouterr().err


def test_data_command_shows_the_warnings_training_would_show(tmp_path):
    """`resnet data` hid every warning, so a split folder that training ignores went unmentioned; skipped
    images stay in its own report rather than one warning line each."""
    rng = np.random.default_rng(0)
    for split in ("train", "validation"):
        folder = tmp_path / "d" / split / "a"
        folder.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (tmp_path / "d" / "train" / "a" / "bad.png").write_bytes(b"")
    # In a process of its own: pytest records warnings instead of printing them.
    proc = subprocess.run([sys.executable, "-m", "resnet", "data", str(tmp_path / "d"), "--cache-dir",
                           str(tmp_path / "c")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    err = proc.stderr
    assert "resnet data: warning: " in err and "folders validation are not read" in err
    assert "bad.png" not in err and "Warning" not in err


@pytest.mark.parametrize("args, words", [
    (["data", "digits", "--val-size", "100", "--seed", "-1"], "seed of the validation carve must be a whole number"),
    (["data", "~no_such_user_here/x"], "starts with a home directory that does not exist"),
])
def test_a_negative_seed_or_an_unknown_home_is_one_sentence(capsys, args, words):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
