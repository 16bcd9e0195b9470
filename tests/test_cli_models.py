"""`resnet models` and `resnet info` through the real command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from resnet.cli import main


def test_models_json_has_the_exact_counts(capsys):
    assert main(["models", "--format", "json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["resnet50"]["params"] == 25_557_032
    assert rows["resnet110"]["params"] == 1_727_962
    assert rows["resnet152"]["paper_macs"] == pytest.approx(11.3e9)
    assert rows["resnet20"]["shortcut"] == "A" and rows["plain20"]["shortcut"] is None
    for r in rows.values():
        assert {"name", "params", "macs", "family", "depth"} <= set(r)


def test_models_table_shows_paper_beside_ours(capsys):
    assert main(["models", "--family", "cifar"]) == 0
    out = capsys.readouterr().out
    assert "resnet56" in out and "853,018" in out and "0.85M params, 6.97% err (Table 6)" in out
    assert "resnet50" not in out


def test_models_v15_marks_the_papers_figure_as_v1(capsys):
    """The 4.089G of a v1.5 ResNet-50 stood beside the paper's 3.8G with nothing to say they differ by design."""
    assert main(["models", "--family", "imagenet", "--variant", "v1.5"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert lines["resnet50"].endswith("4.089G  3.8G MACs (Table 1, v1)")
    assert lines["resnet18"].endswith("1.8G MACs (Table 1)")  # no bottleneck, no variant


def test_info_stages_add_up(capsys):
    assert main(["info", "resnet50", "--variant", "v1.5", "--format", "json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in info["stages"]] == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert sum(s["params"] for s in info["stages"]) == info["params"] == 25_557_032
    assert sum(s["macs"] for s in info["stages"]) == info["macs"]
    assert info["stages"][4]["out_shape"] == [2048, 7, 7]


def test_unknown_model_is_one_sentence_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "resnet", "info", "resnet51"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "unknown model 'resnet51'" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_command_suggests(capsys):
    assert main(["modls"]) == 2
    assert "did you mean models" in capsys.readouterr().err


def test_an_unforeseen_os_error_is_one_sentence_naming_the_path(capsys):
    """Paths the commands do not check themselves (here a name longer than the file system allows) used to
    end in a traceback."""
    long_name = "x" * 300
    assert main(["eval", long_name, "--data", "digits"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("resnet eval: File name too long") and long_name in err and err.count("\n") == 1
