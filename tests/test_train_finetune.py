"""Fine-tuning: `init_from` starts a run from trained weights (a run, a checkpoint or a bare state dict),
keeps the classifier only for the same classes, refuses weights of another network, and is never read
again once the run has a checkpoint. `mean`/`std` replace the data's own normalisation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from resnet import create_model
from resnet.data import load_dataset
from resnet.errors import UserError
from resnet.train import load_recipe, train
from test_train_helpers import tiny_overrides

# lr this small moves no weight measurably in one step: what the run saves is what it started from
STILL = {"max_iters": 1, "lr": 1e-12, "momentum": 0.0, "weight_decay": 0.0, "eval_every": 1,
         "checkpoint_every": 1, "milestones": []}


def _run(out: Path, **extra) -> dict:
    return train(load_recipe("cifar10-resnet20", tiny_overrides(**extra)), out)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model.safetensors")


def _convs_equal(a: dict, b: dict) -> bool:
    names = [k for k in a if k.endswith("conv1.weight") or k.endswith("conv2.weight")]
    return len(names) == 19 and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-9) for k in names)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("source") / "run"
    _run(out, max_iters=4, eval_every=4)
    return out


def _three_class_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for c in ("cat", "dog", "fish"):
        (root / "train" / c).mkdir(parents=True)
        for k in range(12):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / "train" / c / f"{k}.png")
    return root


def test_same_classes_keep_every_layer_the_classifier_included(tmp_path, source, capsys):
    _run(tmp_path / "ft", init_from=str(source), **STILL)
    assert "starting from the weights in" in capsys.readouterr().err
    got, want = _weights(tmp_path / "ft"), _weights(source)
    assert _convs_equal(got, want)
    assert torch.allclose(got["fc.weight"], want["fc.weight"], rtol=0, atol=1e-9)
    _run(tmp_path / "scratch", **STILL)
    assert not _convs_equal(_weights(tmp_path / "scratch"), want)  # without init_from: its own random weights


def test_other_classes_get_a_new_classifier_and_the_rest_is_kept(tmp_path, source, capsys):
    data = _three_class_folder(tmp_path / "three")
    _run(tmp_path / "ft", init_from=str(source / "model.safetensors"), data=str(data), val_size=6,
         cache_dir=str(tmp_path / "cache"), **STILL)
    err = capsys.readouterr().err
    assert ("the classifier, which starts anew for this data's 3 classes (the weights' 10 do not include them "
            "all)") in err
    got = _weights(tmp_path / "ft")
    assert got["fc.weight"].shape == (3, 64) and _convs_equal(got, _weights(source))
    assert json.loads((tmp_path / "ft" / "model.json").read_text())["classes"] == ["cat", "dog", "fish"]


def test_a_subset_of_the_weights_classes_keeps_their_rows_by_name(tmp_path, source, capsys):
    data = tmp_path / "two"
    digits = load_dataset("digits", in_chans=1).splits["train"]
    for name in ("3", "7"):  # two of the source's ten classes, by name
        (data / "train" / name).mkdir(parents=True)
        images = digits.images[digits.labels == int(name)][:12]
        for k, img in enumerate(images):
            Image.fromarray(img[0].numpy()).save(data / "train" / name / f"{k}.png")
    _run(tmp_path / "ft", init_from=str(source), data=str(data), val_size=4, cache_dir=str(tmp_path / "c"), **STILL)
    assert "and the classifier's rows of this data's 2 classes" in capsys.readouterr().err
    got, want = _weights(tmp_path / "ft"), _weights(source)
    assert torch.allclose(got["fc.weight"], want["fc.weight"][[3, 7]], rtol=0, atol=1e-9)
    assert torch.allclose(got["fc.bias"], want["fc.bias"][[3, 7]], rtol=0, atol=1e-9)


def test_a_bare_state_dict_of_the_same_network_loads_and_names_its_normalisation(tmp_path, capsys):
    torch.manual_seed(3)
    model = create_model("resnet20", in_chans=1, num_classes=10)
    torch.save(model.state_dict(), tmp_path / "downloaded.pth")
    _run(tmp_path / "ft", init_from=str(tmp_path / "downloaded.pth"), **STILL)
    err = capsys.readouterr().err
    assert "(assumed for a file that does not record it)" in err and "add mean=[" in err
    assert _convs_equal(_weights(tmp_path / "ft"), model.state_dict())
    _run(tmp_path / "ft2", init_from=str(tmp_path / "downloaded.pth"), mean=[0.45], std=[0.25], **STILL)
    assert "add mean=" not in capsys.readouterr().err  # the user chose a normalisation: nothing to say
    meta = json.loads((tmp_path / "ft2" / "model.json").read_text())
    assert (meta["mean"], meta["std"]) == ([0.45], [0.25])


@pytest.mark.parametrize("change, words", [
    ({"arch": "resnet32"}, "holds resnet20 (in_chans=1, shortcut=A), not the resnet32 (in_chans=1, shortcut=A) "
                           "this run trains; add arch=resnet20 to"),
    ({"shortcut": "B"}, "not the resnet20 (in_chans=1, shortcut=B) this run trains; add shortcut=A"),
])
def test_weights_of_another_network_are_one_sentence(tmp_path, source, change, words):
    with pytest.raises(UserError, match=r"init_from '.*' holds") as err:
        _run(tmp_path / "ft", init_from=str(source), **STILL, **change)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_a_run_with_a_checkpoint_never_reads_init_from_again(tmp_path, source):
    copy = tmp_path / "copy.pth"
    torch.save(_weights(source), copy)
    out = tmp_path / "ft"
    first = _run(out, init_from=str(copy), max_iters=4, eval_every=4, checkpoint_every=2)
    copy.unlink()
    (out / "summary.json").unlink()  # not finished as far as train() can tell: it resumes from the checkpoint
    # the same file spelled another way ('dir/./copy.pth') is the same setting, not a different run
    again = _run(out, init_from=f"{tmp_path}/./copy.pth", max_iters=4, eval_every=4, checkpoint_every=2)
    assert again["iterations"] == first["iterations"] == 4
    with pytest.raises(UserError, match="copy.pth"):  # a new run does need it
        _run(tmp_path / "new", init_from=str(copy), **STILL)


def test_a_bare_bottleneck_file_needs_its_variant_said(tmp_path):
    # v1 and v1.5 have the same shapes; torchvision's weights in the recipes' v1 layout would train silently.
    torch.save(create_model("resnet50", in_chans=1, num_classes=10, variant="v1.5").state_dict(), tmp_path / "tv.pth")
    with pytest.raises(UserError, match=r"does not record where resnet50's down-sampling stride sits; .*add "
                                        r"variant=v1\.5"):
        _run(tmp_path / "ft", arch="resnet50", init_from=str(tmp_path / "tv.pth"), **STILL)
    assert not (tmp_path / "ft" / "checkpoint.pt").exists()
    _run(tmp_path / "ok", arch="resnet50", variant="v1.5", shortcut="B", init_from=str(tmp_path / "tv.pth"), **STILL)
    assert _weights(tmp_path / "ok")["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)


def test_a_bare_file_of_another_network_and_a_folded_export_are_one_sentence(tmp_path, source):
    torch.save(create_model("resnet32", in_chans=1, num_classes=10).state_dict(), tmp_path / "r32.pth")
    with pytest.raises(UserError, match=r"do not fit resnet20: unexpected .*; set arch and its options "
                                        r"\(arch=, shortcut=, variant=\) to the network the weights are for\.$"):
        _run(tmp_path / "a", init_from=str(tmp_path / "r32.pth"), **STILL)
    from resnet.cli import main

    assert main(["export", str(source), "--format", "safetensors", "--fold-bn",
                 "--out", str(tmp_path / "f.safetensors")]) == 0
    with pytest.raises(UserError, match="has its BatchNorm folded into the convolutions"):
        _run(tmp_path / "b", init_from=str(tmp_path / "f.safetensors"), **STILL)
    with pytest.raises(UserError, match=r"init_from '.*nothing\.pth' does not exist"):
        _run(tmp_path / "c", init_from=str(tmp_path / "nothing.pth"), **STILL)


def test_a_run_stopped_mid_way_resumes_bit_for_bit_without_the_init_file(tmp_path, source, monkeypatch):
    copy = tmp_path / "copy.pth"
    torch.save(_weights(source), copy)
    settings = {"init_from": str(copy), "max_iters": 6, "eval_every": 6, "checkpoint_every": 2}
    _run(tmp_path / "whole", **settings)
    monkeypatch.setenv("RESNET_TEST_NAN_AT", "3")  # stops the run at iteration 3; its checkpoint is iteration 2
    with pytest.raises(UserError, match="last good checkpoint: iteration 2"):
        _run(tmp_path / "cut", **settings)
    monkeypatch.delenv("RESNET_TEST_NAN_AT")
    copy.unlink()
    assert _run(tmp_path / "cut", **settings)["iterations"] == 6
    whole, cut = _weights(tmp_path / "whole"), _weights(tmp_path / "cut")
    assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)
