"""BatchNorm folding and the InferenceModel predictor give the eager model's outputs."""

from __future__ import annotations

import pytest
import torch

from helpers import randomise_bn
from resnet import UserError, create_model
from resnet.inference import InferenceModel, count_batchnorms, fold_bn, pad_shortcuts_as_conv
from resnet.models import Bottleneck, PadShortcut


def inputs(shape=(3, 3, 32, 32)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name,opts", [("resnet20", {}), ("resnet20", {"shortcut": "B"}),
                                       ("resnet20", {"shortcut": "C"}), ("plain20", {})])
def test_fold_bn_removes_every_batchnorm_and_keeps_outputs(name, opts):
    torch.manual_seed(0)
    model = randomise_bn(create_model(name, num_classes=7, **opts))
    folded = fold_bn(model)
    assert count_batchnorms(folded) == 0 and count_batchnorms(model) > 0  # the original is untouched
    x = inputs()
    with torch.no_grad():
        assert (folded(x) - model(x)).abs().max() < 1e-4


@pytest.mark.parametrize("variant", ["v1", "v1.5"])
def test_fold_bn_in_a_downsampling_bottleneck(variant):
    torch.manual_seed(0)
    block = randomise_bn(Bottleneck(32, 16, stride=2, shortcut="B", variant=variant))
    folded = fold_bn(block)
    x = inputs((2, 32, 12, 12))
    with torch.no_grad():
        assert count_batchnorms(folded) == 0 and (folded(x) - block(x)).abs().max() < 1e-4


def test_pad_shortcuts_as_conv_is_exact_and_leaves_the_original_alone():
    torch.manual_seed(0)
    model = randomise_bn(create_model("resnet20")).eval()
    rewritten = pad_shortcuts_as_conv(fold_bn(model))
    assert sum(isinstance(m, PadShortcut) for m in model.modules()) == 2
    assert not any(isinstance(m, PadShortcut) for m in rewritten.modules())
    x = inputs((4, 3, 32, 32)) * 3
    with torch.no_grad():
        assert torch.equal(rewritten(x), fold_bn(model)(x))  # bit for bit, not just close


def test_onnx_graph_of_an_option_a_net_is_convolutions_only():
    onnx = pytest.importorskip("onnx")
    from resnet.export import export_meta, onnx_bytes

    model = create_model("resnet20")
    meta = {"arch": "resnet20", "classes": [str(i) for i in range(10)], "input_size": [3, 32, 32]}
    graph = onnx.load_from_string(onnx_bytes(fold_bn(model), export_meta(meta, bn_folded=True, fmt="onnx"))).graph
    ops = {node.op_type for node in graph.node}
    assert "Conv" in ops and not ops & {"Pad", "Slice", "Concat", "BatchNormalization"}


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "auto"])
def test_inference_model_backends_match_eager(backend):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = randomise_bn(create_model("resnet20", num_classes=5))
    meta = {"arch": "resnet20", "classes": list("abcde"), "mean": [0.5] * 3, "std": [0.2] * 3,
            "input_size": [3, 32, 32]}
    predictor = InferenceModel(model, meta, backend=backend)
    for batch in (1, 6):  # also a batch size other than the export's
        x = inputs((batch, 3, 32, 32))
        with torch.no_grad():
            assert (predictor(x) - model(x)).abs().max() < 1e-4
    # Fully convolutional: another image size works on every backend (multi-scale evaluation).
    x = inputs((2, 3, 40, 48))
    with torch.no_grad():
        assert (predictor(x) - model(x)).abs().max() < 1e-4
    if backend == "auto":
        assert predictor.backend == "onnxruntime"


def _bf16_cpu(monkeypatch, native: bool) -> None:
    import resnet.machine

    monkeypatch.setattr(resnet.machine, "has_native_bf16", lambda cpuinfo=None: native)


def test_bf16_inference_follows_fp32_and_returns_float32_logits(monkeypatch):
    _bf16_cpu(monkeypatch, True)  # on a CPU without bf16 units it runs emulated: slow, but the same numbers
    torch.manual_seed(0)
    model = randomise_bn(create_model("resnet20", num_classes=5))
    meta = {"arch": "resnet20", "classes": list("abcde"), "mean": [0.5] * 3, "std": [0.2] * 3,
            "input_size": [3, 32, 32]}
    ours = InferenceModel(model, meta, precision="bf16")
    assert ours.backend == "torch" and ours.precision == "bf16"
    assert {p.dtype for p in ours.module.parameters()} == {torch.bfloat16}
    x = inputs((6, 3, 32, 32))
    with torch.no_grad():
        ref, out = model(x), ours(x)
    cos = torch.nn.functional.cosine_similarity(out, ref, dim=1)
    assert out.dtype == torch.float32 and float(cos.min()) > 0.99, cos  # bf16 keeps 8 bits of mantissa
    assert 0 < float((out - ref).abs().max()) < 0.1 * float(ref.abs().max())  # rounded, so not equal


def test_bf16_inference_is_refused_where_it_would_be_emulated_or_cannot_run(monkeypatch):
    _bf16_cpu(monkeypatch, False)
    with pytest.raises(UserError, match="bf16 inference needs a CPU with AVX512_BF16 or AMX, and this one has "
                                        "neither"):
        InferenceModel(create_model("resnet20"), precision="bf16")
    _bf16_cpu(monkeypatch, True)
    with pytest.raises(UserError, match="bf16 inference runs on PyTorch; use --backend auto, torch or compile"):
        InferenceModel(create_model("resnet20"), precision="bf16", backend="onnxruntime")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_inference_on_a_gpu_follows_fp32():
    torch.manual_seed(0)
    model = randomise_bn(create_model("resnet20", num_classes=5))
    ours = InferenceModel(model, device="cuda", precision="bf16")
    x = inputs((6, 3, 32, 32))
    with torch.no_grad():
        ref, out = model(x), ours(x).cpu()
    cos = torch.nn.functional.cosine_similarity(out, ref, dim=1)
    assert out.dtype == torch.float32 and float(cos.min()) > 0.99, cos


def test_bf16_on_the_command_line(tmp_path, monkeypatch, capsys):
    from resnet.artifacts import save_model_artifacts
    from resnet.cli import main

    run = tmp_path / "run"
    run.mkdir()
    torch.manual_seed(0)
    save_model_artifacts(run, create_model("resnet20", num_classes=10, in_chans=1),
                         {"arch": "resnet20", "options": {"num_classes": 10, "in_chans": 1},
                          "classes": [str(i) for i in range(10)], "mean": [0.5], "std": [0.25],
                          "input_size": [1, 8, 8], "eval_view": "full", "data": "digits"})
    _bf16_cpu(monkeypatch, True)
    assert main(["eval", str(run), "--precision", "bf16", "--device", "cpu"]) == 0
    assert "view full, bf16: n=360" in capsys.readouterr().out
    _bf16_cpu(monkeypatch, False)
    assert main(["eval", str(run), "--precision", "bf16", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("resnet eval: bf16 inference needs a CPU with AVX512_BF16 or AMX") and err.count("\n") == 1


def test_auto_precision_is_bf16_only_where_the_cpu_computes_in_it(monkeypatch):
    from resnet.inference import resolve_precision

    _bf16_cpu(monkeypatch, True)
    assert [resolve_precision("auto", "cpu", b) for b in ("auto", "torch", "compile")] == ["bf16"] * 3
    assert resolve_precision("auto", "cpu", "onnxruntime") == "fp32"  # ONNX Runtime runs the fp32 graph
    assert resolve_precision("auto", "cuda", "auto") == "fp32"  # GPUs: fp32 until measured there
    assert [resolve_precision(p, "cpu") for p in ("fp32", "bf16", "int8")] == ["fp32", "bf16", "int8"]
    model = create_model("resnet20", num_classes=5)
    meta = {"classes": list("abcde"), "input_size": [3, 32, 32]}
    ours = InferenceModel(model, meta, precision="auto")
    assert (ours.precision, ours.backend, ours.dtype) == ("bf16", "torch", torch.bfloat16)
    assert InferenceModel(model, meta).precision == "fp32"  # the library's default does not follow the CPU
    _bf16_cpu(monkeypatch, False)
    assert resolve_precision("auto", "cpu", "torch") == "fp32"
    ours = InferenceModel(model, meta, precision="auto", backend="torch")
    assert (ours.precision, ours.dtype) == ("fp32", torch.float32)
    with pytest.raises(UserError, match="precision must be one of auto, fp32, bf16, int8, not 'fp16'"):
        resolve_precision("fp16")


def _tiny_run(tmp_path):
    from resnet.artifacts import save_model_artifacts

    run = tmp_path / "run"
    run.mkdir()
    torch.manual_seed(0)
    save_model_artifacts(run, randomise_bn(create_model("resnet20", num_classes=10, in_chans=1)),
                         {"arch": "resnet20", "options": {"num_classes": 10, "in_chans": 1},
                          "classes": [str(i) for i in range(10)], "mean": [0.5], "std": [0.25],
                          "input_size": [1, 8, 8], "eval_view": "full", "data": "digits"})
    return run


def test_eval_and_predict_default_to_bf16_on_a_bf16_cpu_and_fp32_elsewhere(tmp_path, monkeypatch, capsys):
    import json

    from resnet.cli import main

    run = _tiny_run(tmp_path)
    image = tmp_path / "digit.png"
    from PIL import Image

    Image.fromarray((torch.rand(8, 8) * 255).to(torch.uint8).numpy()).save(image)
    results = {}
    for native, flags in ((True, []), (False, []), (True, ["--precision", "fp32"])):
        _bf16_cpu(monkeypatch, native)
        assert main(["eval", str(run), "--device", "cpu", "--format", "json", *flags]) == 0
        out = capsys.readouterr()
        res = json.loads(out.out)
        results[(native, *flags)] = res
        want = "bf16" if native and not flags else "fp32"
        assert res["precision"] == want and res["n"] == 360
        note = "resnet eval: bf16 (this CPU computes in it; --precision fp32 runs in fp32)."
        assert (note in out.err) == (want == "bf16"), out.err
        assert main(["predict", str(run), str(image), "--device", "cpu", "--format", "json", *flags]) == 0
        out = capsys.readouterr()
        assert ("resnet predict: bf16 (this CPU computes in it" in out.err) == (want == "bf16"), out.err
        probs = [p["prob"] for p in json.loads(out.out)[0]["predictions"]]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True)
    # fp32 forced on a bf16 CPU scores exactly what fp32 scores on a CPU without bf16.
    assert results[(True, "--precision", "fp32")]["top1_err"] == results[(False,)]["top1_err"]


def test_unknown_backend_is_a_user_error():
    with pytest.raises(UserError, match="backend must be one of"):
        InferenceModel(create_model("resnet20"), backend="tensorrt")


def test_a_model_without_metadata_runs_in_torch_and_onnxruntime_asks_for_it():
    """The ONNX export needs meta's input_size: `InferenceModel(model)` used to fail with KeyError."""
    model = create_model("resnet20", num_classes=3)
    predictor = InferenceModel(model)
    assert predictor.backend == "torch" and predictor(inputs((2, 3, 8, 8))).shape == (2, 3)
    with pytest.raises(UserError, match="onnxruntime backend needs the model's metadata"):
        InferenceModel(model, backend="onnxruntime")


def test_onnxruntime_backend_settles_on_one_thread_setting_and_keeps_outputs():
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = randomise_bn(create_model("resnet20", num_classes=3))
    predictor = InferenceModel(model, {"input_size": [3, 16, 16]}, backend="onnxruntime")
    x = inputs((2, 3, 16, 16))
    with torch.no_grad():
        ref = model(x)
    tuner = predictor._ort
    n = len(tuner.candidates)
    for call in range(16):  # every candidate: one warm-up and TRIALS timed calls
        assert (predictor(x) - ref).abs().max() < 1e-4
        if call < n * (tuner.TRIALS + 1) - 1:  # one candidate after another, never interleaved
            block = (call + 1) // (tuner.TRIALS + 1)
            assert [len(t) for t in tuner.times] == [tuner.TRIALS + 1] * block + [
                (call + 1) % (tuner.TRIALS + 1)] + [0] * (n - block - 1)
    assert tuner.chosen is not None and len(tuner.candidates) == 1


def test_thread_tuner_compares_candidates_per_pixel_not_per_image(monkeypatch):
    """Candidates are timed on different calls; with multi-scale views those differ in image size. Per
    image, a slow candidate timed on small images looked fastest."""
    from resnet.inference import _TunedSession

    clock = [0.0]
    monkeypatch.setattr("time.perf_counter", lambda: clock[0])

    class Session:  # costs `per_pixel` seconds per pixel on the fake clock
        def __init__(self, per_pixel):
            self.per_pixel = per_pixel

        def run(self, _, feed):
            x = feed["input"]
            clock[0] += self.per_pixel * x.shape[0] * x.shape[-2] * x.shape[-1]
            return [x]

    tuner = object.__new__(_TunedSession)
    tuner.candidates = [((2, True), Session(2.0)), ((2, False), Session(1.0)), ((1, True), Session(1.5))]
    tuner.times, tuner.chosen = [[], [], []], None
    block = tuner.TRIALS + 1
    for call in range(3 * block):
        side = 8 if call < block else 16  # the first candidate happens to see the small images
        tuner.run(torch.zeros(1, 3, side, side).numpy())
    assert tuner.chosen == (2, False)


@pytest.mark.parametrize("name, opts, size", [
    ("resnet20", {}, 32), ("plain20", {}, 32), ("resnet18", {}, 64), ("resnet50", {"variant": "v1.5"}, 64),
    ("resnet50", {"variant": "v1"}, 64), ("resnet20", {"shortcut": "B"}, 32),
])
def test_packed_convolutions_give_the_folded_nets_logits(name, opts, size):
    """resnet.packed: weights reordered once, ReLU and the residual addition inside the convolutions. Every
    block kind and shortcut, at the packed size and (through the plain net) at another size."""
    from resnet.packed import available, pack

    if not available():
        pytest.skip("this PyTorch lacks oneDNN's pointwise convolution")
    torch.manual_seed(0)
    model = randomise_bn(create_model(name, num_classes=5, **opts))
    meta = {"arch": name, "classes": list("abcde"), "mean": [0.5] * 3, "std": [0.2] * 3,
            "input_size": [3, size, size]}
    net = fold_bn(model).to(memory_format=torch.channels_last)
    packed = pack(net, [3, size, size])
    assert packed is not None
    kinds = {type(m).__name__ for m in packed.modules()}
    assert "PackedConv" in kinds and "Conv2d" not in kinds and "ReLU" not in kinds  # all packed, ReLUs fused
    predictor = InferenceModel(model, meta, backend="torch")
    assert predictor.packed
    for shape in ((1, 3, size, size), (5, 3, size, size), (2, 3, size + 8, size)):
        x = inputs(shape)
        with torch.no_grad():
            assert (predictor(x) - model(x)).abs().max() < 1e-4 * max(1.0, float(model(x).abs().max()))


def test_packing_declines_what_it_does_not_know():
    from resnet.packed import pack

    model = randomise_bn(create_model("resnet20", num_classes=5))
    assert pack(model, [3, 32, 32]) is None  # BatchNorm not folded: the convolutions alone are not the net
    assert pack(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)).eval(), [3, 32, 32]) is None
    meta = {"arch": "resnet20", "classes": list("abcde"), "mean": [0.5] * 3, "std": [0.2] * 3,
            "input_size": [3, 32, 32]}
    assert not InferenceModel(model, meta, backend="torch", fold=False).packed
    assert not InferenceModel(model, {k: v for k, v in meta.items() if k != "input_size"}, backend="torch").packed


@pytest.mark.parametrize("name", ["mps", "meta", "xla"])
def test_a_device_our_code_does_not_run_on_is_one_sentence(name):
    from resnet.inference import resolve_device

    with pytest.raises(UserError, match=f"device '{name}' is not supported; use auto, cpu, cuda or cuda:N"):
        resolve_device(name)
