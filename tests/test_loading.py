"""Loading models from every kind of file, and refusing the ones that are unsafe, damaged or mismatched."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest
import torch

from helpers import randomise_bn
from resnet import UserError, create_model
from resnet.artifacts import save_model_artifacts
from resnet.cli import main
from resnet.export import export_model
from resnet.loading import load_model, parse_options, state_digest

CLASSES = ["cat", "dog", "owl", "yak"]




def meta_for(arch: str = "resnet20", classes=CLASSES) -> dict:
    return {"arch": arch, "options": {"num_classes": len(classes)}, "classes": list(classes),
            "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "input_size": [3, 32, 32], "eval_view": "full"}


@pytest.fixture
def run_dir(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = randomise_bn(create_model("resnet20", num_classes=len(CLASSES)))
    out = tmp_path / "run"
    out.mkdir()
    save_model_artifacts(out, model, meta_for())
    return out, model


def same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return torch.allclose(a.eval()(x), b.eval()(x), atol=1e-5)


def one_sentence(err: pytest.ExceptionInfo, path: Path) -> str:
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


def test_run_dir_safetensors_and_json_load_the_same_model(run_dir):
    out, model = run_dir
    for path in (out, out / "model.safetensors", out / "model.json"):
        loaded, meta = load_model(path)
        assert same_outputs(loaded, model)
        assert meta["classes"] == CLASSES and meta["arch"] == "resnet20"
        assert meta["options"]["shortcut"] == "A" and meta["source"].endswith("model.safetensors")


def test_training_checkpoint_loads_with_and_without_model_json(run_dir, tmp_path):
    out, model = run_dir
    state = {"format": "resnet-checkpoint/1", "iteration": 5, "ema": None,
             "config": {"arch": "resnet20", "in_chans": 3, "shortcut": None, "variant": "v1"},
             "model": {f"module.{k}": v for k, v in model.state_dict().items()}, "optimizer": {"state": {}}}
    torch.save(state, out / "checkpoint.pt")
    loaded, meta = load_model(out / "checkpoint.pt")
    assert same_outputs(loaded, model) and meta["classes"] == CLASSES  # classes from model.json beside it
    alone = tmp_path / "alone"
    alone.mkdir()
    torch.save(state, alone / "checkpoint.pt")
    loaded, meta = load_model(alone)  # a run dir with only the checkpoint: arch from its config
    assert same_outputs(loaded, model) and meta["classes"] == ["0", "1", "2", "3"]


def test_torchvision_layout_state_dict_needs_and_uses_arch(run_dir, tmp_path):
    _, model = run_dir
    path = tmp_path / "weights.pth"
    torch.save({f"_orig_mod.{k}": v for k, v in model.state_dict().items()}, path)
    with pytest.raises(UserError, match="--arch") as err:
        load_model(path)
    one_sentence(err, path)
    loaded, meta = load_model(path, arch="resnet20")
    assert same_outputs(loaded, model)
    assert meta["options"]["num_classes"] == 4 and "classes" in meta["assumed"]


def test_bottleneck_state_dict_without_variant_says_v15_for_torchvision(tmp_path):
    path = tmp_path / "resnet50.pth"
    torch.save({"fc.weight": torch.zeros(1000, 2048), "conv1.weight": torch.zeros(64, 3, 7, 7)}, path)
    with pytest.raises(UserError, match=r"variant=v1\.5 for torchvision"):
        load_model(path, arch="resnet50")


def test_malicious_pickle_is_refused_and_its_payload_never_runs(tmp_path):
    marker = tmp_path / "pwned.txt"

    class Payload:
        def __reduce__(self):
            return (Path.write_text, (marker, "owned"))

    blob = pickle.dumps({"conv1.weight": torch.zeros(1), "x": Payload()})
    # The payload is real: unpickling it unsafely does write the file.
    pickle.loads(blob)
    assert marker.exists()
    marker.unlink()
    for path in (tmp_path / "evil_raw.pt", tmp_path / "evil_zip.pth"):
        if path.name.startswith("evil_raw"):
            path.write_bytes(blob)
        else:
            torch.save({"conv1.weight": torch.zeros(1), "x": Payload()}, path)
        with pytest.raises(UserError, match="refusing to load") as err:
            load_model(path, arch="resnet20")
        assert "pathlib" in one_sentence(err, path)  # names what the payload would have called
        assert not marker.exists()


def test_truncated_files_give_one_sentence_naming_the_path(run_dir, tmp_path):
    out, model = run_dir
    weights = out / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt") as err:
        load_model(out)
    one_sentence(err, weights)
    pt = tmp_path / "ckpt.pt"
    torch.save(model.state_dict(), pt)
    pt.write_bytes(pt.read_bytes()[:-100])
    with pytest.raises(UserError, match="truncated or corrupt") as err:
        load_model(pt, arch="resnet20")
    one_sentence(err, pt)
    # Not a model at all (a text file under a model's name): said so, not "corrupt (101)"
    text = tmp_path / "notes.pt"
    text.write_text("hello, these are notes\n")
    with pytest.raises(UserError, match="is not a model file") as err:
        load_model(text, arch="resnet20")
    one_sentence(err, text)


def test_bit_flips_are_caught(run_dir, tmp_path):
    out, model = run_dir
    # A zip checkpoint: the CRC of the flipped record no longer matches.
    pt = tmp_path / "ckpt.pt"
    torch.save(model.state_dict(), pt)
    raw = bytearray(pt.read_bytes())
    raw[len(raw) // 2] ^= 0x04
    pt.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="checksum") as err:
        load_model(pt, arch="resnet20")
    one_sentence(err, pt)
    # An exported safetensors file: its embedded sha256 of the weights no longer matches.
    st = tmp_path / "export.safetensors"
    export_model(model, load_model(out)[1], "safetensors", st)
    raw = bytearray(st.read_bytes())
    raw[-5] ^= 0x01
    st.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="checksum") as err:
        load_model(st)
    one_sentence(err, st)
    # ... and of its embedded model.json: a flipped bit in the mean (0.5 -> 0.4) loaded and scored silently.
    st2 = tmp_path / "export2.safetensors"
    export_model(model, load_model(out)[1], "safetensors", st2)
    raw = st2.read_bytes()
    assert raw.count(b'mean\\": [0.5,') == 1
    st2.write_bytes(raw.replace(b'mean\\": [0.5,', b'mean\\": [0.4,'))
    with pytest.raises(UserError, match="embedded metadata does not match the recorded checksum") as err:
        load_model(st2)
    one_sentence(err, st2)
    # model.json carrying weights_sha256 (see docs/contracts.md, Loading) protects model.safetensors too.
    doc = json.loads((out / "model.json").read_text())
    state = load_model(out)[0].state_dict()
    doc["weights_sha256"] = state_digest(state)
    (out / "model.json").write_text(json.dumps(doc))
    weights = out / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-7] ^= 0x02
    weights.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="checksum") as err:
        load_model(out)
    one_sentence(err, weights)
    # A flipped bit in the safetensors header breaks its JSON.
    raw = bytearray(weights.read_bytes())
    raw[10] ^= 0x80
    weights.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_model(out)


def test_option_values_are_read_as_the_model_reads_them(tmp_path):
    assert parse_options(["shortcut=a", "num_classes= 4", " variant =v1"]) == {
        "shortcut": "A", "num_classes": 4, "variant": "v1"}
    meta = meta_for()
    meta["options"]["shortcut"] = "A"  # as training records it
    save_model_artifacts(tmp_path, create_model("resnet20", num_classes=len(CLASSES)), meta)
    # shortcut=a is the recorded option A, not a contradiction of it.
    _, loaded = load_model(tmp_path, options=parse_options(["shortcut=a", "num_classes= 4"]))
    assert loaded["options"]["shortcut"] == "A"
    with pytest.raises(UserError, match="option shortcut='B' contradicts the shortcut='A' recorded"):
        load_model(tmp_path, options=parse_options(["shortcut=b"]))
    # Only ASCII integers are numbers; the rest stay strings for the model's own one-sentence check.
    assert parse_options(["a=-3", "b=--5", "c=\u00b2"]) == {"a": -3, "b": "--5", "c": "\u00b2"}
    torch.save(create_model("resnet20").state_dict(), tmp_path / "bare.pt")
    with pytest.raises(UserError, match="num_classes must be a positive whole number, not '--5'"):
        load_model(tmp_path / "bare.pt", arch="resnet20", options=parse_options(["num_classes=--5"]))


def test_architecture_mismatch_names_the_keys(run_dir, tmp_path):
    _, model = run_dir
    path = tmp_path / "w.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(UserError) as err:
        load_model(path, arch="resnet32")  # 5 blocks per stage instead of 3
    msg = one_sentence(err, path)
    assert "do not fit resnet32" in msg and "missing layer1.3." in msg
    with pytest.raises(UserError, match=r"unexpected layer1\.0\.downsample"):
        torch.save({**model.state_dict(), "layer1.0.downsample.0.weight": torch.zeros(16, 16, 1, 1)}, path)
        load_model(path, arch="resnet20", options={"shortcut": "A"})
    torch.save({**model.state_dict(), "conv1.weight": torch.zeros(16, 1, 3, 3)}, path)
    with pytest.raises(UserError, match=r"wrong shape conv1\.weight \(16x1x3x3 in the file, 16x3x3x3"):
        load_model(path, arch="resnet20", options={"in_chans": 3})


def test_a_model_json_of_another_model_is_not_called_a_corrupt_file(run_dir, tmp_path):
    """Weights beside another model's model.json were reported as truncated or corrupt (the checksum ran
    before the architecture check): the weights were intact, the description was of another network."""
    out, _ = run_dir
    other = tmp_path / "other"
    other.mkdir()
    save_model_artifacts(other, create_model("resnet32", num_classes=len(CLASSES)), meta_for("resnet32"))
    (other / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    with pytest.raises(UserError, match="do not fit resnet32") as err:
        load_model(other)
    assert "corrupt" not in str(err.value)


def test_class_count_mismatch_names_the_counts(run_dir):
    out, _ = run_dir
    doc = json.loads((out / "model.json").read_text())
    doc["options"]["num_classes"] = 7
    doc["classes"] = [f"c{i}" for i in range(7)]
    (out / "model.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match="has 4 output classes .* but the model expects 7"):
        load_model(out)
    doc["options"]["num_classes"] = 4
    doc["classes"] = ["a", "b", "c"]
    (out / "model.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match="lists 3 class names but the model has 4 outputs"):
        load_model(out)


@pytest.mark.parametrize("key, value, words", [
    ("input_size", [1, 32, 32], "'input_size' (it must be [channels, height, width] with 3 channels"),
    ("input_size", [3, 8], "'input_size'"),
    ("options", "x", "'options' (it must be a mapping"),
    ("data", 5, "'data'"),
    ("mean", ["0.3"] * 3, "'mean' (it must be 3 numbers"),
    ("std", [0.0] * 3, "'std' (it must be 3 positive numbers"),
    ("std", [-0.3] * 3, "'std'"),
    ("eval_view", "sideways", "'eval_view' (it must be one of full, flip"),
    ("classes", [1, 2, 3, 4], "'classes'"),
    ("val_split", {"val_size": "all"}, "'val_split'"),
])
def test_a_hand_edited_model_json_is_one_sentence(run_dir, key, value, words):
    """Each of these gave a traceback in eval or predict, or (a zero or negative std) silently wrong scores
    and NaN probabilities in predict's JSON."""
    out, _ = run_dir
    doc = json.loads((out / "model.json").read_text())
    (out / "model.json").write_text(json.dumps({**doc, key: value}))
    with pytest.raises(UserError, match="the model description of .* has a bad " + re.escape(words)) as err:
        load_model(out)
    one_sentence(err, out)


def test_a_null_field_of_model_json_takes_the_default_and_says_so(run_dir, capsys):
    """"eval_view": null scored with the center view (224-pixel crops of a 32-pixel model) without a word."""
    out, _ = run_dir
    doc = json.loads((out / "model.json").read_text())
    (out / "model.json").write_text(json.dumps({**doc, "eval_view": None}))
    assert load_model(out)[1]["eval_view"] == "full"
    del doc["input_size"]
    (out / "model.json").write_text(json.dumps(doc))
    from argparse import Namespace

    from resnet.loading import load_from_args

    load_from_args(Namespace(model=str(out), arch=None, option=[], trained_weights=False))
    assert "does not record input_size; assuming the cifar defaults (mean [0.5, 0.5, 0.5], input 32x32" in (
        capsys.readouterr().err)


def test_cli_reports_a_bad_model_in_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x00" * 20)
    assert main(["predict", str(bad), str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(bad) in err
    assert main(["eval", str(tmp_path / "missing"), "--data", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_model_json_digest_catches_a_flipped_bit_and_ignores_the_checkpoint(tmp_path):
    """save_model_artifacts records the weights' sha256; a flipped bit in model.safetensors is refused, while
    a checkpoint beside the same model.json (other weights) still loads."""
    model = create_model("resnet20", num_classes=3)
    meta = {"arch": "resnet20", "options": {"num_classes": 3}, "classes": ["a", "b", "c"], "mean": [0.5] * 3,
            "std": [0.25] * 3, "input_size": [3, 32, 32]}
    weights = save_model_artifacts(tmp_path / "run", model, meta)
    assert "weights_sha256" in json.loads((tmp_path / "run" / "model.json").read_text())
    load_model(tmp_path / "run")
    torch.save({"model": create_model("resnet20", num_classes=3).state_dict(), "config": {"arch": "resnet20"}},
               tmp_path / "run" / "c.pt")  # a training checkpoint of ours records its config
    load_model(tmp_path / "run" / "c.pt")
    (tmp_path / "alone").mkdir()
    (tmp_path / "alone" / "intact.safetensors").write_bytes(weights.read_bytes())
    load_model(tmp_path / "alone" / "intact.safetensors", arch="resnet20", options={"num_classes": 3})
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x10
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match="checksum"):
        load_model(tmp_path / "run")
    # model.safetensors copied on its own, without model.json: its header carries the same digest
    (tmp_path / "alone" / "w.safetensors").write_bytes(bytes(data))
    with pytest.raises(UserError, match="w.safetensors.*checksum"):
        load_model(tmp_path / "alone" / "w.safetensors", arch="resnet20", options={"num_classes": 3})


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_an_exported_file_given_as_the_model_says_what_it_is(run_dir, tmp_path, fmt):
    """It used to be called 'truncated or corrupt ... copy it again', which sends the user the wrong way."""
    if fmt == "onnx":
        pytest.importorskip("onnx")
    model, meta = load_model(run_dir[0])
    out = export_model(model, meta, fmt, tmp_path / f"m.{'pt' if fmt == 'torchscript' else 'onnx'}")
    kind = "TorchScript" if fmt == "torchscript" else "ONNX"
    with pytest.raises(UserError, match=f"is an? {kind} export, for other runtimes.*run directory or model"):
        load_model(out)


def test_a_state_dict_beside_a_runs_model_json_is_not_described_by_it(run_dir, tmp_path):
    """Only checkpoint.pt goes with the model.json beside it; a downloaded .pth in that folder is another
    model, and taking that model.json's classes and normalisation for it would be wrong."""
    folder, model = run_dir
    torch.save(model.state_dict(), folder / "downloaded.pth")
    with pytest.raises(UserError, match="does not say which network it holds"):
        load_model(folder / "downloaded.pth")
    _, meta = load_model(folder / "downloaded.pth", arch="resnet20")
    assert "classes" in meta["assumed"]
    # A timm-style training checkpoint ({"state_dict", "epoch"}) there was taken for the run's own.
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, folder / "timm_ckpt.pth")
    _, meta = load_model(folder / "timm_ckpt.pth", arch="resnet20")
    assert "classes" in meta["assumed"]


def test_onnxruntime_on_a_gpu_device_is_refused_not_silently_run_on_the_cpu(run_dir):
    from resnet.inference import InferenceModel

    model, meta = load_model(run_dir[0])
    with pytest.raises(UserError, match="onnxruntime backend runs on the CPU; use --backend torch"):
        InferenceModel(model, meta, backend="onnxruntime", device="cuda")


def test_a_file_is_read_by_what_it_holds_not_by_its_suffix(run_dir, tmp_path):
    """A torch.save state dict named *.safetensors was called corrupt, and a safetensors file named *.pth
    'not a model file'."""
    from safetensors.torch import save_file

    _, model = run_dir
    state = model.state_dict()
    pickled, flat = tmp_path / "w" / "p.safetensors", tmp_path / "w" / "s.pth"
    pickled.parent.mkdir()
    torch.save(state, pickled)
    save_file({k: v.contiguous() for k, v in state.items()}, flat)
    for path in (pickled, flat):
        loaded, meta = load_model(path, arch="resnet20")
        assert same_outputs(loaded, model) and meta["source"] == str(path)


@pytest.mark.parametrize("edit, key", [
    ({"arch": 5}, "arch"), ({"arch": None}, "arch"), ({"arch": ["resnet20"]}, "arch"),
    ({"assumed": 5}, "assumed"),
    ({"input_size": [3, True, 32]}, "input_size"),
    ({"mean": [125.3, 123.0, 113.9]}, "mean"),  # 0-255 units: every image would score as noise
    ({"std": [63.0, 62.1, 66.7]}, "std"),
    ({"classes": ["cat", "dog", "cat", "yak"]}, "classes"),  # a repeated name loses a class in eval
])
def test_a_hand_edited_model_json_is_one_sentence_naming_the_field(run_dir, edit, key):
    out, _ = run_dir
    meta = json.loads((out / "model.json").read_text())
    (out / "model.json").write_text(json.dumps({**meta, **edit}))
    with pytest.raises(UserError, match=f"has a bad '{key}'") as err:
        load_model(out)
    one_sentence(err, out / "model.safetensors")


def test_a_checkpoint_beside_another_runs_model_json_is_refused_not_mislabelled(run_dir, tmp_path):
    out, model = run_dir
    own = {**meta_for(), "options": {"num_classes": 4, "in_chans": 3, "shortcut": "A"}}
    state = {"format": "resnet-checkpoint/1", "iteration": 5, "ema": None, "model_meta": own,
             "config": {"arch": "resnet20", "in_chans": 3, "shortcut": "A", "variant": "v1"},
             "model": model.state_dict(), "optimizer": {"state": {}}}
    torch.save(state, out / "checkpoint.pt")
    loaded, meta = load_model(out / "checkpoint.pt")  # its own run's model.json: agreed, loads
    assert same_outputs(loaded, model) and meta["classes"] == CLASSES
    other = json.loads((out / "model.json").read_text())
    (out / "model.json").write_text(json.dumps({**other, "classes": ["c0", "c1", "c2", "c3"]}))
    with pytest.raises(UserError, match="describes another model than .* \\(their classes differ\\)") as err:
        load_model(out / "checkpoint.pt")
    one_sentence(err, out / "checkpoint.pt")


def test_a_run_directory_without_model_json_is_described_by_its_checkpoint(run_dir):
    """model.json is written after model.safetensors: a run stopped between the two kept asking for --arch."""
    out, model = run_dir
    own = {**meta_for(), "options": {"num_classes": 4, "in_chans": 3, "shortcut": "A"}}
    torch.save({"format": "resnet-checkpoint/1", "iteration": 5, "ema": None, "model_meta": own,
                "config": {"arch": "resnet20"}, "model": model.state_dict(), "optimizer": {"state": {}}},
               out / "checkpoint.pt")
    (out / "model.json").unlink()
    loaded, meta = load_model(out)
    assert same_outputs(loaded, model) and meta["classes"] == CLASSES
    assert meta["source"].endswith("checkpoint.pt")


def test_a_model_path_under_home_is_expanded(run_dir, monkeypatch):
    out, model = run_dir
    monkeypatch.setenv("HOME", str(out.parent))
    loaded, _ = load_model(f"~/{out.name}")
    assert same_outputs(loaded, model)
