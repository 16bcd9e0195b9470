"""`resnet eval`: errors counted once per image, classes matched by name, views, per-class output, torchrun."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from resnet import UserError, create_model
from resnet.artifacts import save_model_artifacts
from resnet.cli import main
from resnet.evaluate import Scorer, class_mapping, evaluate
from resnet.loading import load_model

# Data classes (sorted folder names) and how many test images each has.
COUNTS = {"apple": 2, "banana": 3, "cherry": 5}


def image_folder(root: Path, counts: dict[str, int] = COUNTS, size: int = 8) -> Path:
    rng = np.random.default_rng(0)
    for cls, n in counts.items():
        (root / "test" / cls).mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "test" / cls / f"{i}.png")
    return root


def constant_model(out: Path, classes: list[str], favourite: str) -> Path:
    """A run dir whose model always predicts `favourite` (fc bias), then the next classes in order."""
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=len(classes)).eval()
    model.fc.weight.data.zero_()
    order = [favourite] + [c for c in classes if c != favourite]
    model.fc.bias.data = torch.tensor([10.0 - order.index(c) for c in classes])
    out.mkdir(parents=True, exist_ok=True)
    save_model_artifacts(out, model, {"arch": "resnet20", "options": {"num_classes": len(classes)},
                                      "classes": classes, "mean": [0.5] * 3, "std": [0.25] * 3,
                                      "input_size": [3, 8, 8], "eval_view": "full"})
    return out


def test_classes_in_another_order_still_score_right(tmp_path):
    data = image_folder(tmp_path / "data")
    # The model's class order differs from the data's sorted order, and it has an extra class.
    run = constant_model(tmp_path / "run", ["cherry", "durian", "apple", "banana"], favourite="cherry")
    model, meta = load_model(run)
    res = evaluate(model, meta, str(data), cache_dir=str(tmp_path / "cache"), per_class=True, backend="torch")
    assert res["n"] == 10 and res["split"] == "test"
    assert res["top1_err"] == pytest.approx(0.5)  # every image called cherry: the 5 cherries are right
    # top-4 of 4 classes is always right; by position (cherry = data index 2 = model "apple") it would not be.
    assert res["top5_err"] == 0.0 and res["top5_k"] == 4
    per = {r["class"]: r for r in res["per_class"]}
    assert per["cherry"]["top1_err"] == 0 and per["apple"]["top1_err"] == 1 and per["apple"]["n"] == 2
    assert "durian" not in per


def test_a_bare_state_dict_names_no_classes_so_its_outputs_are_the_datas_classes_in_order(tmp_path, capsys):
    """torchvision/timm weights carry no class names; matching by the assumed names '0', '1', ... refused
    every real folder. Output i is the data's i-th class (sorted folders, as torchvision's wnids)."""
    data = image_folder(tmp_path / "data")
    run = constant_model(tmp_path / "run", ["apple", "banana", "cherry"], favourite="cherry")
    torch.save(load_file(run / "model.safetensors"), tmp_path / "bare.pth")
    args = ["eval", str(tmp_path / "bare.pth"), "--arch", "resnet20", "--data", str(data), "--format", "json",
            "--cache-dir", str(tmp_path / "cache"), "--backend", "torch", "--per-class"]
    assert main(args) == 0
    captured = capsys.readouterr()
    res = json.loads(captured.out)
    assert res["n"] == 10 and res["top1_err"] == pytest.approx(0.5)  # output 2 is 'cherry': 5 of 10 right
    assert {r["class"] for r in res["per_class"]} == set(COUNTS)
    assert "records no class names; its 3 outputs are taken as the data's classes in order" in captured.err
    two = image_folder(tmp_path / "two", {"apple": 1, "banana": 1})
    assert main([*args[:5], str(two), *args[6:]]) == 2
    assert "records no class names and has 3 outputs, but" in capsys.readouterr().err


def test_top5_counts_the_second_choice(tmp_path):
    data = image_folder(tmp_path / "data")
    classes = ["apple", "banana", "cherry", "d", "e", "f", "g"]
    run = constant_model(tmp_path / "run", classes, favourite="d")  # order: d, apple, banana, cherry, e...
    model, meta = load_model(run)
    res = evaluate(model, meta, str(data), cache_dir=str(tmp_path / "cache"), backend="torch")
    assert res["top1_err"] == 1.0 and res["top5_err"] == 0.0


def test_a_class_missing_from_the_model_is_a_clear_error(tmp_path):
    data = image_folder(tmp_path / "data")
    run = constant_model(tmp_path / "run", ["apple", "banana"], favourite="apple")
    with pytest.raises(UserError, match="classes the model was not trained on \\('cherry'\\)"):
        evaluate(*load_model(run), str(data), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(UserError, match="not trained on"):
        class_mapping(["a"], ["a", "b"])


def test_class_names_match_whatever_unicode_form_the_file_system_spelt_them_in():
    """macOS writes "é" decomposed (e + combining accent), Linux keeps what it was given, usually composed:
    the same class to the user, so the same class to evaluation."""
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    assert class_mapping(["apple", composed], [decomposed, "apple"]).tolist() == [1, 0]
    assert class_mapping([decomposed], [composed]).tolist() == [0]


def test_missing_split_names_the_choices(tmp_path):
    data = image_folder(tmp_path / "data")
    run = constant_model(tmp_path / "run", list(COUNTS), favourite="apple")
    with pytest.raises(UserError, match="no 'val' split; choose one of test"):
        evaluate(*load_model(run), str(data), split="val", cache_dir=str(tmp_path / "cache"))


def test_a_train_only_folder_defaults_to_the_val_split_the_model_was_trained_with(tmp_path):
    """A run on a folder with train/ only (as ../shared/data/cifar10) carved its val split; eval without
    --split used to stop with 'has no test or val split' although --split val works."""
    data = image_folder(tmp_path / "data")
    (data / "test").rename(data / "train")
    run = constant_model(tmp_path / "run", list(COUNTS), favourite="apple")
    cache = str(tmp_path / "cache")
    with pytest.raises(UserError, match=r"no test or val split \(it has train\); pass --split train, or --split "
                                        r"val --val-size N"):
        evaluate(*load_model(run), str(data), cache_dir=cache)
    meta = json.loads((run / "model.json").read_text())
    (run / "model.json").write_text(json.dumps({**meta, "val_split": {"val_size": 4, "seed": 0}}))
    res = evaluate(*load_model(run), str(data), cache_dir=cache, backend="torch")
    assert res["split"] == "val" and res["n"] == 4 and res["val_carved"] == {"val_size": 4, "seed": 0}
    # A recorded carve larger than this folder's train split: the message said 'choose fewer' of a number
    # the user never gave.
    (run / "model.json").write_text(json.dumps({**meta, "val_split": {"val_size": 5000, "seed": 0}}))
    with pytest.raises(UserError, match=r"the model's run carved 5000 validation images .* has 10 in train; "
                                        r"pass --val-size N"):
        evaluate(*load_model(run), str(data), cache_dir=cache, backend="torch")


@pytest.mark.parametrize("view", ["center", "10crop"])
def test_multi_view_evaluation_counts_each_image_once(tmp_path, view):
    data = image_folder(tmp_path / "data", {"apple": 1, "banana": 2})
    run = constant_model(tmp_path / "run", ["apple", "banana"], favourite="banana")
    model, meta = load_model(run)
    res = evaluate(model, meta, str(data), view=view, cache_dir=str(tmp_path / "cache"), backend="torch",
                   batch_size=2)
    assert res["n"] == 3 and res["view"] == view and res["top1_err"] == pytest.approx(1 / 3)


def test_scorer_sums_are_per_sample():
    s = Scorer(3, topk=2)
    s.update(torch.tensor([[3.0, 2, 1], [1, 3, 2], [1, 2, 3]]), torch.tensor([0, 0, 0]))
    r = s.result(["a", "b", "c"], per_class=True)
    assert r["n"] == 3 and r["top1_err"] == pytest.approx(2 / 3) and r["top5_err"] == pytest.approx(2 / 3)


def test_eval_cli_json_per_class_and_confusion_png(tmp_path, capsys):
    data = image_folder(tmp_path / "data")
    run = constant_model(tmp_path / "run", ["banana", "cherry", "apple"], favourite="banana")
    png = tmp_path / "cm.png"
    rc = main(["eval", str(run), "--data", str(data), "--format", "json", "--per-class", "--confusion", str(png),
               "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n"] == 10 and res["top1_err"] == pytest.approx(0.7) and {"top1_err", "top5_err", "n"} <= set(res)
    assert [r["class"] for r in res["per_class"]] == ["banana", "cherry", "apple"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A name without a suffix gets .png, and the output says so; another suffix is refused before evaluating.
    common = ["--data", str(data), "--cache-dir", str(tmp_path / "cache")]
    assert main(["eval", str(run), *common, "--format", "json", "--confusion", str(tmp_path / "cm2")]) == 0
    assert json.loads(capsys.readouterr().out)["confusion_png"] == f"{tmp_path / 'cm2'}.png"
    assert (tmp_path / "cm2.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["eval", str(run), *common, "--confusion", str(tmp_path / "model.json")]) == 2
    assert "--confusion writes a PNG image; name it *.png" in capsys.readouterr().err
    assert not (tmp_path / "model.json").exists()
    # This model's model.json records no training data, so --data is required, in one sentence.
    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err
    assert "does not record the data it was trained on; pass --data" in err and err.count("\n") == 1


def test_eval_under_torchrun_counts_every_sample_once(tmp_path):
    data = image_folder(tmp_path / "data")
    run = constant_model(tmp_path / "run", list(COUNTS), favourite="cherry")
    from resnet.data import load_dataset

    load_dataset(str(data), cache_dir=str(tmp_path / "cache"))  # decode cache built once, not raced by ranks
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "resnet", "eval", str(run), "--data", str(data), "--format", "json", "--backend", "torch",
           "--batch-size", "2", "--cache-dir", str(tmp_path / "cache")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout[-1000:] + proc.stderr[-3000:]
    assert proc.stdout.count('"n":') == 1, proc.stdout  # rank 0 alone prints
    res = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert res["world_size"] == 2 and res["n"] == 10 and res["top1_err"] == pytest.approx(0.5)


def test_eval_scores_the_val_split_a_run_carved_and_the_runs_own_view(tmp_path, capsys):
    """A run on digits (train/test only) carves 96 validation images; `resnet eval RUN --split val` finds
    the same images, uses the run's flip view, and reproduces the run's own validation errors for the
    averaged and (--trained-weights) the trained weights."""
    from resnet.train import train
    from resnet.train.config import load_recipe
    from test_train_helpers import tiny_overrides

    run = tmp_path / "run"
    summary = train(load_recipe("cifar10-resnet20", tiny_overrides(ema_decay=0.9, tta_flip=True)), run)
    meta = json.loads((run / "model.json").read_text())
    assert meta["eval_view"] == "flip" and meta["val_split"] == {"val_size": 96, "seed": 0}
    assert meta["data"] == "digits"  # what `resnet eval RUN` scores when given no --data
    cache = str(tmp_path / "cache")
    res = evaluate(*load_model(run), "digits", split="val", cache_dir=cache, backend="torch")
    assert res["n"] == 96 and res["view"] == "flip" and res["val_carved"] == {"val_size": 96, "seed": 0}
    # The loop scored in train precision without folding BN: allow one of 96 images to tip over.
    assert abs(res["top1_err"] - summary["val_top1_err"]) <= 1 / 96 + 1e-9
    trained = evaluate(*load_model(run, trained=True), "digits", split="val", cache_dir=cache, backend="torch")
    assert abs(trained["top1_err"] - summary["val_top1_err_trained"]) <= 1 / 96 + 1e-9
    # A run from before model.json recorded its data and carve: its config.yaml beside it says the same.
    del meta["val_split"], meta["data"]
    (run / "model.json").write_text(json.dumps(meta))
    assert load_model(run)[1]["val_split"] == {"val_size": 96, "seed": 0}
    assert load_model(run)[1]["data"] == "digits"
    # The command line says what it carved; --val-size carves another split size on request; without
    # --data it scores the run's own data.
    assert main(["eval", str(run), "--split", "val", "--val-size", "50", "--cache-dir", cache,
                 "--backend", "torch", "--precision", "fp32"]) == 0
    assert " on digits [val: 50 of train, seed 0], view flip: n=50 " in capsys.readouterr().out
    with pytest.raises(UserError, match="--trained-weights needs a training run's checkpoint.pt"):
        load_model(run / "model.safetensors", trained=True)


def test_eval_without_data_reads_a_named_source_from_the_runs_data_dir(tmp_path, monkeypatch, capsys):
    """A run on cifar10 read from --data-dir records that folder; `resnet eval RUN` scores the same files
    from there with no flags, where the default data folder has no copy (and no network)."""
    import resnet.data.sources as src
    from resnet.train import train
    from resnet.train.config import load_recipe
    from test_data_sources import make_archive
    from test_train_helpers import tiny_overrides

    archive, truth = make_archive("cifar10", n=4)  # 20 training and 4 test images, 32x32
    data_dir = tmp_path / "datasets"
    data_dir.mkdir()
    (data_dir / "cifar-10-binary.tar.gz").write_bytes(archive)
    unreachable = src.CifarSpec(**{**src.CIFAR["cifar10"].__dict__, "url": "http://127.0.0.1:9/none",
                                   "md5": hashlib.md5(archive).hexdigest()})
    monkeypatch.setitem(src.CIFAR, "cifar10", unreachable)
    monkeypatch.setenv("RESNET_DATA_DIR", str(tmp_path / "empty"))
    run = tmp_path / "run"
    overrides = tiny_overrides(data="cifar10", in_chans=3, val_size=4, batch_size=4, ref_batch_size=4,
                               max_iters=2, milestones=[], eval_every=2, checkpoint_every=2)
    train(load_recipe("cifar10-resnet20", overrides + [f"data_dir={data_dir}"]), run)
    meta = json.loads((run / "model.json").read_text())
    assert meta["data"] == "cifar10" and meta["data_dir"] == str(data_dir.resolve())
    cache = str(tmp_path / "cache")
    assert main(["eval", str(run), "--format", "json", "--cache-dir", cache, "--backend", "torch"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == len(truth["test"][0][0])
    # Without the record the default folder is searched, has no copy, and the download fails: one sentence.
    del meta["data_dir"]
    (run / "model.json").write_text(json.dumps(meta))
    assert main(["eval", str(run), "--cache-dir", cache, "--backend", "torch"]) == 2
    err = capsys.readouterr().err
    assert "put cifar-10-binary.tar.gz into" in err and str(tmp_path / "empty") in err and err.count("\n") == 1
    # A run from before model.json recorded its data: its config.yaml says both the source and the folder.
    del meta["data"]
    (run / "model.json").write_text(json.dumps(meta))
    assert main(["eval", str(run), "--format", "json", "--cache-dir", cache, "--backend", "torch"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == len(truth["test"][0][0])


def test_a_run_that_has_not_finished_is_scored_with_its_own_classes_normalisation_and_view(tmp_path, capsys):
    """model.json is written when a run finishes; a checkpoint alone used to be scored with CIFAR-10's
    mean and std and the 'full' view, silently. Checkpoints now describe their model; an older one gets a
    note saying what is assumed."""
    from resnet.train import checkpoint, train
    from resnet.train.config import load_recipe
    from test_train_helpers import tiny_overrides

    run = tmp_path / "run"
    train(load_recipe("cifar10-resnet20", tiny_overrides(tta_flip=True)), run)
    finished = json.loads((run / "model.json").read_text())
    (run / "model.json").unlink()
    (run / "model.safetensors").unlink()  # as in a run still training: only its checkpoint
    _, meta = load_model(run)
    for key in ("classes", "mean", "std", "input_size", "eval_view", "data", "val_split", "options"):
        assert meta[key] == finished[key], key
    assert meta["eval_view"] == "flip" and meta["mean"] != pytest.approx([0.4914]) and "assumed" not in meta
    cache = str(tmp_path / "cache")
    assert main(["eval", str(run), "--cache-dir", cache, "--backend", "torch"]) == 0
    assert "note:" not in capsys.readouterr().err
    state = checkpoint.load(run / checkpoint.NAME)
    del state["model_meta"]  # a checkpoint written before checkpoints carried it
    checkpoint.save(run / checkpoint.NAME, state)
    assert main(["eval", str(run), "--data", "digits", "--cache-dir", cache, "--backend", "torch"]) == 0
    err = capsys.readouterr().err
    assert "does not record classes, mean, std, input_size, eval_view; assuming the cifar defaults" in err


def test_skipped_counts_the_evaluated_splits_unreadable_images_only(tmp_path):
    """It used to count every split's (the training split's too)."""
    data = image_folder(tmp_path / "data")
    (data / "test" / "apple" / "broken.png").write_bytes(b"not a png")
    for cls in COUNTS:
        (data / "train" / cls).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(data / "train" / cls / "ok.png")
    for i in range(2):
        (data / "train" / "apple" / f"broken{i}.png").write_bytes(b"not a png either")
    run = constant_model(tmp_path / "run", ["apple", "banana", "cherry"], favourite="cherry")
    with pytest.warns(UserWarning):
        res = evaluate(*load_model(run), str(data), split="test", cache_dir=str(tmp_path / "c"), backend="torch")
    assert res["n"] == 10 and res["skipped"] == 1



@pytest.mark.parametrize("view", ["full", "flip"])
def test_images_of_another_size_are_scored_as_predict_sees_them(tmp_path, capsys, view):
    """The full and flip views fed a folder of 12x16 images to a model of 8x8 input as they were, while
    `resnet predict` brings each image to the model's size first: the two disagreed (89.5% against 0.5% error
    on upscaled digits). Both now resize the shorter side and take the centre: eval's model sees exactly the
    tensors predict's does."""
    from resnet.inference import InferenceModel
    from resnet.predict import prepare

    rng = np.random.default_rng(1)
    classes = ["apple", "banana", "cherry"]
    for cls in classes:
        (tmp_path / "data" / "test" / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(
                tmp_path / "data" / "test" / cls / f"{i}.png")
    info = {"arch": "resnet20", "options": {"num_classes": 3}, "classes": classes, "mean": [0.5] * 3,
            "std": [0.25] * 3, "input_size": [3, 8, 8], "eval_view": view}
    run = tmp_path / "run"
    run.mkdir()
    save_model_artifacts(run, create_model("resnet20", num_classes=3).eval(), info)
    model, meta = load_model(run)
    net = InferenceModel(model, meta, backend="torch")
    inputs = []

    def recording(x):
        inputs.append(x)
        return net(x)

    res = evaluate(model, meta, str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"), predictor=recording)
    assert res["resized_to"] == 8 and res["n"] == 12
    assert f"are 12x16 and the model's input is 8x8; the {view} view resizes" in capsys.readouterr().err
    paths = sorted(str(p) for p in (tmp_path / "data" / "test").rglob("*.png"))
    expected = torch.stack([prepare(torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1), meta)
                            for p in paths])
    assert torch.allclose(torch.cat(inputs), expected.flatten(0, -4), atol=1e-5)


def test_a_confusion_path_that_cannot_be_written_is_refused_before_the_evaluation(tmp_path, capsys, monkeypatch):
    """It was found unwritable only after the whole evaluation, whose result was then lost; '~' in
    --confusion=~/cm.png (which the shell leaves alone) made a folder named '~'."""
    import resnet.evaluate

    data = image_folder(tmp_path / "data")
    run = constant_model(tmp_path / "run", ["banana", "cherry", "apple"], favourite="banana")
    (tmp_path / "a_file").write_text("x")
    calls = []
    real = resnet.evaluate.evaluate
    monkeypatch.setattr(resnet.evaluate, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    rc = main(["eval", str(run), "--data", str(data), "--confusion", str(tmp_path / "a_file" / "cm.png")])
    assert rc == 2 and not calls
    err = capsys.readouterr().err
    assert "cannot write the confusion matrix into" in err and "a file is in the way" in err
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert main(["eval", str(run), "--data", str(data), "--cache-dir", str(tmp_path / "cache"),
                 "--confusion=~/plots/cm.png"]) == 0
    assert (tmp_path / "home" / "plots" / "cm.png").is_file() and not (tmp_path / "~").exists()
