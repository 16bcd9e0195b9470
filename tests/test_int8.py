"""int8 inference (resnet.quantize): calibration images, the quantized graph, and the --precision int8 flags."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import randomise_bn
from resnet import UserError, create_model
from resnet.artifacts import save_model_artifacts
from resnet.cli import main
from resnet.inference import InferenceModel

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

CLASSES = ["ant", "bee", "cat"]


def folder(root: Path, per_class: dict[str, int], size: int = 16) -> Path:
    rng = np.random.default_rng(len(str(root)))
    for split, n in per_class.items():
        for c, cls in enumerate(CLASSES):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):  # each class its own colour cast, so a model can tell them apart
                pixels = rng.integers(0, 160, (size, size, 3)).astype(np.uint8)
                pixels[..., c] += 90
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")
    return root


def meta(data: str | None = None, size: int = 16) -> dict:
    m = {"arch": "resnet20", "options": {"num_classes": 3}, "classes": CLASSES, "mean": [0.4] * 3,
         "std": [0.25] * 3, "input_size": [3, size, size], "eval_view": "full"}
    if data:
        m["data"] = data
    return m


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomise_bn(create_model("resnet20", num_classes=3)).eval()


def run_dir(path: Path, data: str | None = None) -> Path:
    path.mkdir(parents=True)
    save_model_artifacts(path, model(), meta(data))
    return path


def batches(n: int = 64, seed: int = 0) -> list[torch.Tensor]:
    return list(torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)).split(32))


def test_int8_logits_follow_fp32_and_the_stem_and_classifier_stay_fp32():
    from resnet.export import export_meta, onnx_bytes
    from resnet.inference import fold_bn
    from resnet.quantize import quantize_onnx

    net = model()
    fp32 = onnx_bytes(fold_bn(net), export_meta(meta(), bn_folded=True, fmt="onnx"))
    q = onnx.load_from_string(quantize_onnx(fp32, batches()))
    nodes = list(q.graph.node)
    # Every convolution but the first reads a dequantized (int8) weight; the first one and the Gemm read floats.
    produced_by = {out: n for n in nodes for out in n.output}
    convs = [n for n in nodes if n.op_type == "Conv"]
    weight_from_dq = [produced_by.get(c.input[1]) is not None and produced_by[c.input[1]].op_type == "DequantizeLinear"
                      for c in convs]
    assert weight_from_dq[0] is False and all(weight_from_dq[1:]) and len(convs) == 21
    gemm = next(n for n in nodes if n.op_type == "Gemm")
    assert gemm.input[1] not in produced_by
    props = {p.key: p.value for p in q.metadata_props}
    assert json.loads(props["resnet"])["precision"] == "int8" and json.loads(props["classes"]) == CLASSES
    # Close to fp32 on inputs it was not calibrated on: a broken scale or an overflowing kernel is far off.
    x = torch.cat(batches(64, seed=5))
    ours = InferenceModel(net, meta(), precision="int8", calibration=batches())
    ref = InferenceModel(net, meta(), backend="torch")
    a, b = ours(x), ref(x)
    cos = torch.nn.functional.cosine_similarity(a - a.mean(0), b - b.mean(0), dim=0)
    assert ours.backend == "onnxruntime" and ours.precision == "int8"
    assert float(cos.min()) > 0.95, cos  # measured 0.975-0.99 per class
    assert float((a.argmax(1) == b.argmax(1)).float().mean()) >= 0.9


def _conv_weight_ranges(q) -> list[int]:
    """The largest |int8 weight| of each quantized convolution of the QDQ model `q`."""
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    produced_by = {out: n for n in q.graph.node for out in n.output}
    ranges = []
    for conv in (n for n in q.graph.node if n.op_type == "Conv"):
        dq = produced_by.get(conv.input[1])
        if dq is not None and dq.op_type == "DequantizeLinear":
            w = inits[dq.input[0]]
            assert w.dtype == np.int8
            ranges.append(int(np.abs(w.astype(np.int32)).max()))
    return ranges


@pytest.mark.parametrize("bits", [7, 8])
def test_weight_bits_bound_the_int8_weights_and_the_file_records_them(bits):
    """7-bit weights stay within +-64, so the u8 x s8 pair sums of CPUs without VNNI fit in 16 bits; 8-bit
    weights use the full +-127 (each channel's largest weight maps to the end of the range)."""
    from resnet.export import export_meta, onnx_bytes
    from resnet.inference import fold_bn
    from resnet.quantize import quantize_onnx

    fp32 = onnx_bytes(fold_bn(model()), export_meta(meta(), bn_folded=True, fmt="onnx"))
    q = onnx.load_from_string(quantize_onnx(fp32, batches(), weight_bits=bits))
    ranges = _conv_weight_ranges(q)
    assert len(ranges) == 20 and max(ranges) == {7: 64, 8: 127}[bits] and min(ranges) >= {7: 63, 8: 126}[bits]
    props = {p.key: p.value for p in q.metadata_props}
    assert json.loads(props["resnet"])["int8_weight_bits"] == bits
    with pytest.raises(UserError, match="int8 weights have 7 or 8 bits, not 4"):
        quantize_onnx(fp32, batches(), weight_bits=4)


def test_the_default_weight_bits_follow_vnni_and_a_portable_file_gets_7(monkeypatch):
    import resnet.machine
    from resnet.quantize import weight_bits_for

    for vnni, bits in ((True, 8), (False, 7)):
        monkeypatch.setattr(resnet.machine, "has_vnni", lambda cpuinfo=None, v=vnni: v)
        assert weight_bits_for() == bits and weight_bits_for(portable=True) == 7
        assert weight_bits_for(8, portable=True) == 8 and weight_bits_for(7) == 7
        ours = InferenceModel(model(), meta(), precision="int8", calibration=batches(32), threads=1)
        assert ours.weight_bits == bits


def test_int8_refuses_other_backends_devices_and_a_missing_calibration():
    with pytest.raises(UserError, match="int8 inference runs on ONNX Runtime on the CPU"):
        InferenceModel(model(), meta(), backend="torch", precision="int8", calibration=batches())
    with pytest.raises(UserError, match="needs calibration images"):
        InferenceModel(model(), meta(), precision="int8")
    with pytest.raises(UserError, match="precision must be one of auto, fp32, bf16, int8, not 'int4'"):
        InferenceModel(model(), meta(), precision="int4")


def test_calibration_images_are_a_seeded_draw_and_offset_gives_others(tmp_path):
    from resnet.data import load_dataset
    from resnet.quantize import calibration_batches

    data = folder(tmp_path / "data", {"train": 10})
    split = load_dataset(str(data), cache_dir=str(tmp_path / "cache")).splits["train"]
    first = torch.cat(calibration_batches(split, meta(), size=12, batch_size=5))
    again = torch.cat(calibration_batches(split, meta(), size=12, batch_size=5))
    other = torch.cat(calibration_batches(split, meta(), size=18, offset=12))
    assert first.shape == (12, 3, 16, 16) and torch.equal(first, again) and other.shape[0] == 18
    rows = {tuple(r.flatten()[:20].tolist()) for r in first}
    assert not rows & {tuple(r.flatten()[:20].tolist()) for r in other}  # all 30 images, none twice
    assert abs(float(first.mean())) < 3  # normalised with the model's mean/std, not raw 0-255 pixels
    with pytest.raises(UserError, match="too few to draw"):
        calibration_batches(split, meta(), size=5, offset=30)


def test_eval_with_int8_calibrates_on_train_and_says_so(tmp_path, capsys):
    from resnet.quantize import weight_bits_for

    data = folder(tmp_path / "data", {"train": 8, "test": 4})
    run = run_dir(tmp_path / "run")
    common = ["eval", str(run), "--data", str(data), "--cache-dir", str(tmp_path / "cache"), "--format", "json"]
    assert main(common + ["--precision", "fp32"]) == 0
    fp32 = json.loads(capsys.readouterr().out)
    assert main(common + ["--precision", "int8", "--calibration-size", "20"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["precision"] == "int8" and fp32["precision"] == "fp32"
    assert res["calibration"] == {"split": "train", "n": 20, "weight_bits": weight_bits_for()}
    assert res["split"] == "test" and res["n"] == 12
    assert main(common[:-2] + ["--precision", "int8", "--weight-bits", "7"]) == 0
    out = capsys.readouterr().out
    assert "view full, int8: n=12" in out and "images of the train split, 7-bit weights)" in out


def test_export_int8_writes_onnx_with_its_metadata_and_refuses_other_formats(tmp_path, capsys):
    from resnet.export import read_onnx_meta

    data = folder(tmp_path / "data", {"train": 6})
    run = run_dir(tmp_path / "run", data=str(data))
    out = tmp_path / "q.onnx"
    assert main(["export", str(run), "--format", "onnx", "--precision", "int8", "--out", str(out)]) == 0
    line = capsys.readouterr().out  # all 18 images calibrate (fewer than 512), none are left to check on
    assert "onnx int8, 7-bit weights" in line and "calibrated on 18 images" in line and "not checked" in line
    assert read_onnx_meta(out)["int8_weight_bits"] == 7  # on any CPU: the file may run on one without VNNI
    assert main(["export", str(run), "--format", "onnx", "--precision", "int8", "--out", str(out),
                 "--calibration-size", "10", "--weight-bits", "8"]) == 0
    line = capsys.readouterr().out
    assert "onnx int8, 8-bit weights" in line
    assert re.search(r"top-1 agrees with PyTorch fp32 on \d+\.\d% of 8 other images", line)
    assert read_onnx_meta(out)["precision"] == "int8" and read_onnx_meta(out)["classes"] == CLASSES
    assert read_onnx_meta(out)["int8_weight_bits"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "q.onnx", "run"]  # no temporary left
    assert main(["export", str(run), "--format", "torchscript", "--precision", "int8", "--out",
                 str(tmp_path / "q.pt")]) == 2
    assert "--precision int8 writes ONNX" in capsys.readouterr().err and not (tmp_path / "q.pt").exists()


def test_predict_int8_needs_data_to_calibrate_on(tmp_path, capsys):
    data = folder(tmp_path / "data", {"train": 4})
    run = run_dir(tmp_path / "run")
    image = str(data / "train" / "bee" / "0.png")
    assert main(["predict", str(run), image, "--precision", "int8"]) == 2
    err = capsys.readouterr().err
    assert "does not record the data it was trained on; pass --calibration-data" in err and err.count("\n") == 1
    assert main(["predict", str(run), image, "--precision", "int8", "--calibration-data", str(data),
                 "--format", "json"]) == 0
    captured = capsys.readouterr()
    res = json.loads(captured.out)
    assert res[0]["path"] == image and len(res[0]["predictions"]) == 3
    assert "int8, calibrated on 12 images" in captured.err


def test_calibration_flags_without_int8_are_refused_in_one_sentence(tmp_path, capsys):
    run = run_dir(tmp_path / "run")
    assert main(["eval", str(run), "--calibration-size", "5"]) == 2
    assert capsys.readouterr().err == ("resnet eval: --calibration-size is for int8 models only; add --precision "
                                       "int8, or leave it out.\n")
    assert main(["predict", str(run), "x.png", "--calibration-data", "digits", "--calibration-size", "3"]) == 2
    assert "--calibration-size and --calibration-data are for int8 models only" in capsys.readouterr().err
    assert main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "m.onnx"), "--weight-bits", "8"]) == 2
    assert "--weight-bits is for int8 models only; add --precision int8" in capsys.readouterr().err
    assert main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "m.onnx"), "--precision", "int8",
                 "--calibration-size", "0"]) == 2
    assert "--calibration-size must be at least 1 image, not 0." in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("vnni", [False, True])
def test_eight_bit_weights_on_a_cpu_without_vnni_are_warned_of_where_they_run(monkeypatch, capsys, vnni):
    import argparse

    import resnet.machine
    from resnet.commands._common import check_int8_flags

    monkeypatch.setattr(resnet.machine, "has_vnni", lambda cpuinfo=None: vnni)
    args = argparse.Namespace(precision="int8", weight_bits=8, calibration_size=None, calibration_data=None)
    check_int8_flags(args)
    err = capsys.readouterr().err
    assert ("8-bit weights can overflow there; --weight-bits 7" in err) is not vnni and err.count("\n") <= 1
    check_int8_flags(args, runs_here=False)  # export: the file may be meant for a VNNI CPU
    check_int8_flags(argparse.Namespace(precision="int8", weight_bits=7, calibration_size=None,
                                        calibration_data=None))
    assert capsys.readouterr().err == ""
