"""ONNX and TorchScript exports reproduce PyTorch's outputs on real images, with a dynamic batch, and carry
their metadata; safetensors exports load back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import randomise_bn
from resnet import create_model
from resnet.artifacts import save_model_artifacts
from resnet.cli import main
from resnet.data.decode import decode_image
from resnet.export import export_model, read_onnx_meta, read_torchscript
from resnet.loading import load_model

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "train"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]




def real_images(n: int) -> torch.Tensor:
    """n real CIFAR-10 JPEGs (read in place, never copied), normalised with CIFAR-10's statistics."""
    if not CIFAR.is_dir():
        pytest.skip("the shared CIFAR-10 JPEGs are not on this machine")
    paths = [CIFAR / CLASSES[i % 10] / f"{i // 10:04d}.jpg" for i in range(n)]
    x = torch.stack([torch.from_numpy(decode_image(p)) for p in paths]).float() / 255
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = randomise_bn(create_model("resnet20", num_classes=10))
    out = tmp_path_factory.mktemp("run")
    save_model_artifacts(out, model, {"arch": "resnet20", "options": {"num_classes": 10}, "classes": CLASSES,
                                      "mean": MEAN, "std": STD, "input_size": [3, 32, 32], "eval_view": "full"})
    return out


def test_onnx_matches_pytorch_on_real_images_with_dynamic_batch(run_dir, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model, meta = load_model(run_dir)
    path = export_model(model, meta, "onnx", tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = real_images(12)
    with torch.no_grad():
        ref = model(x)
    for batch in (x[:1], x[:5], x):  # the export was traced with batch 1
        out = torch.from_numpy(sess.run(None, {"input": batch.numpy()})[0])
        assert (out - ref[: len(batch)]).abs().max() <= 1e-4
    assert sess.get_inputs()[0].shape[0] == "batch"
    doc = read_onnx_meta(path)
    assert doc["classes"] == CLASSES and doc["mean"] == MEAN and doc["std"] == STD and doc["bn_folded"]
    props = sess.get_modelmeta().custom_metadata_map
    assert json.loads(props["classes"]) == CLASSES
    import onnx

    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "BatchNormalization" not in ops  # folded into the convolutions


def test_torchscript_matches_pytorch_on_real_images_and_carries_metadata(run_dir, tmp_path):
    model, meta = load_model(run_dir)
    path = export_model(model, meta, "torchscript", tmp_path / "m.pt")
    module, doc = read_torchscript(path)
    x = real_images(7)  # traced with batch 2
    with torch.no_grad():
        assert (module(x) - model(x)).abs().max() <= 1e-4
    assert doc["classes"] == CLASSES and doc["std"] == STD and doc["input_size"] == [3, 32, 32]


@pytest.mark.parametrize("fold", [False, True])
def test_safetensors_export_is_self_describing_and_reloads(run_dir, tmp_path, fold):
    model, meta = load_model(run_dir)
    path = export_model(model, meta, "safetensors", tmp_path / "m.safetensors", fold=fold)
    loaded, doc = load_model(path)  # no model.json beside it: the metadata is in the header
    x = real_images(4)
    with torch.no_grad():
        assert (loaded(x) - model(x)).abs().max() <= 1e-4
    assert doc["classes"] == CLASSES and doc["bn_folded"] is fold
    again, doc2 = load_model(export_model(loaded, doc, "safetensors", tmp_path / "again.safetensors"))
    assert doc2["bn_folded"] is fold  # a folded model stays folded; it cannot be unfolded
    with torch.no_grad():
        assert (again(x) - model(x)).abs().max() <= 1e-4


def test_export_cli_writes_and_checks_each_format(run_dir, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    for fmt in ("onnx", "torchscript", "safetensors"):
        out = tmp_path / f"m.{fmt}"
        assert main(["export", str(run_dir), "--format", fmt, "--out", str(out)]) == 0
        assert out.is_file() and "max |logit difference|" in capsys.readouterr().out
    assert main(["export", str(run_dir), "--format", "onnx", "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.safetensors", "m.torchscript"]  # no temporaries


def test_an_export_that_fails_its_check_never_replaces_the_file_at_out(run_dir, tmp_path, capsys, monkeypatch):
    """The file used to be written under its final name first and checked after, so a failing export had
    already replaced a good one."""
    import resnet.export as export_mod

    out = tmp_path / "m.torchscript"
    out.write_bytes(b"the user's earlier, good export")
    monkeypatch.setattr(export_mod, "export_error", lambda *a, **k: (0.5, 10.0))
    assert main(["export", str(run_dir), "--format", "torchscript", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "differs from PyTorch by 5.00e-01" in err and f"nothing was written to '{out}'" in err
    assert out.read_bytes() == b"the user's earlier, good export" and [p.name for p in tmp_path.iterdir()] == [out.name]
    # Within the tolerance relative to the logits' size (5e-4 on logits up to 626, as a randomly
    # initialised ResNet-50 gives), the export is accepted.
    monkeypatch.setattr(export_mod, "export_error", lambda *a, **k: (5e-4, 626.0))
    assert main(["export", str(run_dir), "--format", "torchscript", "--out", str(out)]) == 0
    assert out.read_bytes() != b"the user's earlier, good export"
    (tmp_path / "file").write_text("a file where a folder should be")
    assert main(["export", str(run_dir), "--format", "torchscript", "--out", str(tmp_path / "file" / "m.pt")]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_export_never_replaces_the_model_it_reads_nor_takes_another_formats_name(run_dir, tmp_path, capsys):
    """`--out RUN/model.safetensors --format onnx` used to write ONNX over the trained weights."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    for fmt, out in [("onnx", run / "model.safetensors"), ("safetensors", run / "model.safetensors"),
                     ("torchscript", run / "model.json"), ("torchscript", run / "checkpoint.pt"),
                     ("safetensors", tmp_path / "x.onnx"), ("onnx", tmp_path / "x.json")]:
        assert main(["export", str(run), "--format", fmt, "--out", str(out)]) == 2, (fmt, out)
        err = capsys.readouterr().err
        assert ("would replace the files of the model" in err or "is named like another kind" in err), err
        assert "\n" not in err.strip()
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before and not (tmp_path / "x.onnx").exists()
    # beside the model under a name of its own is fine, as is the same model file given by its path
    assert main(["export", str(run / "model.safetensors"), "--format", "torchscript", "--out",
                 str(run / "model.pt"), "--no-check"]) == 0
    # The files of another training run were not protected: an export named checkpoint.pt there ended its
    # resumability. And the hint named the very file it refused.
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    (other / "config.yaml").write_text("arch: resnet20\n")
    (other / "checkpoint.pt").write_bytes(b"the other run's state")
    capsys.readouterr()
    assert main(["export", str(run), "--format", "torchscript", "--out", str(other / "checkpoint.pt")]) == 2
    assert "would replace a file of the training run in" in capsys.readouterr().err
    assert (other / "checkpoint.pt").read_bytes() == b"the other run's state"
    assert main(["export", str(run / "model.safetensors"), "--format", "safetensors", "--out",
                 str(run / "model.safetensors")]) == 2
    assert f"e.g. {run / 'run-export.safetensors'}." in capsys.readouterr().err


def test_what_a_bare_state_dict_did_not_record_stays_a_guess_in_its_export(run_dir, tmp_path):
    from safetensors.torch import load_file

    torch.save(load_file(run_dir / "model.safetensors"), tmp_path / "bare.pth")
    assert main(["export", str(tmp_path / "bare.pth"), "--arch", "resnet20", "--format", "safetensors",
                 "--out", str(tmp_path / "e.safetensors"), "--no-check"]) == 0
    _, meta = load_model(tmp_path / "e.safetensors")
    assert {"classes", "mean", "std"} <= set(meta["assumed"])
    _, described = load_model(run_dir)
    assert "assumed" not in described


def test_export_out_under_home_is_expanded_and_a_file_in_the_way_is_named(run_dir, tmp_path, capsys, monkeypatch):
    """--out=~/m.safetensors (which the shell leaves alone) wrote into a folder named '~'."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(run_dir), "--format", "safetensors", "--out=~/m.safetensors"]) == 0
    assert (tmp_path / "home" / "m.safetensors").is_file() and not (tmp_path / "~").exists()
    (tmp_path / "a_file").write_text("x")
    assert main(["export", str(run_dir), "--format", "safetensors", "--out", str(tmp_path / "a_file" / "m")]) == 2
    assert "a file is in the way of its folder" in capsys.readouterr().err
