"""CPU inference throughput: our predictor vs eager fp32 NCHW PyTorch vs ONNX Runtime, in one process.

Cases (the issue's): ResNet-50 at 224x224, batch 1 and 32; ResNet-20 at 32x32, batch 256. Per case:
- eager: the model as a typical user runs it (fp32, NCHW, BatchNorm unfused, `torch.no_grad`);
- ours: `resnet.inference.InferenceModel(precision="auto")`, what eval and predict run by default: on CPUs
  that compute in bf16 (AVX512_BF16, AMX) the folded channels_last model in bfloat16 on PyTorch (oneDNN;
  convolutions packed by resnet.packed), elsewhere fp32 on the default backend (ONNX Runtime with the
  thread setting it measured fastest during its first calls). Its line's `precision` says which. bf16 is
  checked like int8 (agreement and cosine below; validation error in docs/inference.md);
- ours fp32, only where ours is bf16: the fp32 default backend, as `--precision fp32` runs;
- onnxruntime: the same exported ONNX model (BN folded) in a default `InferenceSession`;
- ours int8: `InferenceModel(precision="int8")`, the same ONNX model statically quantized (resnet.quantize),
  calibrated on real images other than the checked ones. Its accuracy is not equal to fp32 by construction:
  its line reports top-1 agreement with eager on the checked images, and docs/inference.md the validation error
  in both precisions of trained ResNet-20s and of a ResNet-50 trained on CIFAR images
  (benchmarks/precision_accuracy.py). Its logits are also compared by cosine similarity per image: on these
  untrained models the top classes are near ties, so top-1 agreement says little there.
Methods are timed in interleaved rounds (eager, ours, ort, eager, ...) so that load from other processes hits all
three alike; the figure is the median, and the `_paired` ratios are medians over rounds of each round's ratio (calls
close in time share the machine's state, which drifts on a VM). Before each timed call the benchmark sleeps
SETTLE_S: the runtime that ran just before keeps its worker threads spinning for a while after returning, and
without the pause each method was timed against the previous one's spinning threads (measured on 2 cores, ResNet-20
batch 256: two ONNX Runtime sessions with equal settings differed by 20% depending on which ran second, and eager
lost 15%; with 0.2 s pauses both sessions ran alike). Each case runs in a fresh process of its own, so no case's
figures depend on which ran before: eager PyTorch's speed follows the C allocator's state (glibc adapts its mmap and
trim thresholds to the largest blocks freed so far), and after the ResNet-50 cases had run in the same process,
eager ResNet-20 at batch 256 ran 1439 images/s, against 941-959 in a process of its own. Equal accuracy: on real
CIFAR-10 JPEGs (upscaled for ResNet-50) every method's logits are compared with eager's (max abs difference) and
top-1 must agree on every image. The models are freshly initialised with randomised BatchNorm statistics (no trained
ImageNet weights here), which exercises folding as trained weights would.

Allocator: the `resnet` command sets glibc's malloc to keep freed memory (`resnet.machine.keep_freed_memory`),
which speeds up the PyTorch methods (eager, ours in bf16) and not ONNX Runtime's (its own arena). It is
process-wide, so with `--malloc kept` (the default, as the commands run) eager runs with it too, a stronger
baseline than a plain script's; `--malloc default` leaves glibc as a plain script has it, for every method.
Each line records which (`malloc`).

Fraction of peak: FLOPs = 2 x multiply-adds (resnet.complexity), over the nominal FP32 peak (cores x 32 or 64
FLOP/cycle x reported clock) and over the FMA peak measured now (benchmarks/common.py). Prints one JSON
line per figure. Run: python benchmarks/infer.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common import add_malloc_option, apply_malloc_option, fractions, machine, paired_ratio
from resnet import create_model
from resnet.complexity import layer_costs
from resnet.data.decode import decode_image
from resnet.data.views import center_view
from resnet.export import export_meta, onnx_bytes
from resnet.inference import InferenceModel, default_threads, fold_bn

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "cifar10" / "train"
CASES = [("resnet50", 224, 1, 25), ("resnet50", 224, 32, 7), ("resnet20", 32, 256, 21)]
CALIBRATION = {"resnet50": 64, "resnet20": 512}  # images the int8 model is calibrated on (after the checked ones)
SETTLE_S = 0.25  # idle time before each timed call, so no other runtime's threads are still spinning
MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


def real_images(n: int, size: int, offset: int = 0) -> torch.Tensor:
    """n real CIFAR-10 JPEGs (read in place, one class after another, from the `offset`-th), normalised, at
    size x size."""
    if not DATA.is_dir():
        return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1 + offset))
    classes = sorted(p.name for p in DATA.iterdir() if p.is_dir())
    paths = [DATA / classes[i % len(classes)] / f"{i // len(classes):04d}.jpg" for i in range(offset, offset + n)]
    x = torch.stack([torch.from_numpy(decode_image(p)) for p in paths]).float()
    if size != x.shape[-1]:
        x = center_view(x, resize=round(size * 256 / 224), crop=size)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD).view(1, 3, 1, 1) * 255
    return ((x - mean) / std).contiguous()


def randomised(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(name, **({"variant": "v1.5"} if name == "resnet50" else {})).eval()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def run_case(name: str, size: int, batch: int, rounds: int, env: dict) -> list[dict]:
    import onnxruntime as ort

    model = randomised(name)
    meta = {"arch": name, "classes": [str(i) for i in range(model.num_classes)], "mean": MEAN, "std": STD,
            "input_size": [3, size, size], "eval_view": "full"}
    flops = 2 * sum(c.macs for c in layer_costs(model, (3, size, size)))
    ours = InferenceModel(model, meta, precision="auto")
    check = real_images(max(batch, 8), size)
    calibration = real_images(CALIBRATION[name], size, offset=len(check)).split(32)
    ours_int8 = InferenceModel(model, meta, precision="int8", calibration=calibration)
    ref_sess = ort.InferenceSession(onnx_bytes(fold_bn(model), export_meta(meta, bn_folded=True, fmt="onnx")),
                                    providers=["CPUExecutionProvider"])

    def eager(x):
        with torch.no_grad():
            return model(x)

    def onnxruntime(x):
        return torch.from_numpy(ref_sess.run(None, {"input": x.numpy()})[0])

    methods = {"eager": eager, "ours": ours, "onnxruntime": onnxruntime, "ours int8": ours_int8}
    if ours.precision != "fp32":
        methods["ours fp32"] = InferenceModel(model, meta, precision="fp32")
    # Equal accuracy on real images (8 at batch 1, else one batch), fed in batches of the case's size.
    ref = torch.cat([eager(c) for c in check.split(batch)])
    agree = {}
    for key, fn in methods.items():
        out = torch.cat([fn(c) for c in check.split(batch)])
        cos = torch.nn.functional.cosine_similarity(out.float(), ref.float(), dim=1)
        agree[key] = {"max_abs_logit_diff": float((out - ref).abs().max()),
                      "max_abs_logit": float(ref.abs().max()), "logit_cosine_min": round(float(cos.min()), 5),
                      "top1_agree": float((out.argmax(1) == ref.argmax(1)).float().mean()), "n": len(ref)}
    x = check[:batch].contiguous()  # the accuracy check above was also every method's warm-up
    chosen = {}
    for key in ("ours", "ours int8", "ours fp32"):  # let the ONNX Runtime ones finish choosing their threads
        fn = methods.get(key)
        if fn is None:
            continue
        while fn._ort is not None and fn._ort.chosen is None:
            fn(x)
        if fn._ort is not None:
            chosen[key] = {"threads": fn._ort.chosen[0], "spin": fn._ort.chosen[1]}
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(rounds):
        for key, fn in methods.items():
            time.sleep(SETTLE_S)
            t = time.perf_counter()
            fn(x)
            times[key].append(time.perf_counter() - t)
    ips = {k: batch / statistics.median(v) for k, v in times.items()}
    lines = []
    for key in methods:
        precision = methods[key].precision if key.startswith("ours") else "fp32"
        lines.append({
            "bench": "infer", "model": name, "input": size, "batch": batch, "method": key,
            "backend": methods[key].backend if key.startswith("ours") else key,
            "precision": precision,
            **({"int8_weight_bits": ours_int8.weight_bits} if key == "ours int8" else {}),
            **({"ort_setting": chosen[key]} if key in chosen else {}),
            "images_per_s": round(ips[key], 2),
            "vs_eager": round(ips[key] / ips["eager"], 3), "vs_onnxruntime": round(ips[key] / ips["onnxruntime"], 3),
            "vs_eager_paired": paired_ratio(times["eager"], times[key]),
            "vs_onnxruntime_paired": paired_ratio(times["onnxruntime"], times[key]),
            "gflop_per_image": round(flops / 1e9, 3), **fractions(ips[key] * flops / 1e9, env),
            **({"peak_note": f"{precision}: the model's FLOPs over the fp32 peaks, as if it ran in fp32"}
               if precision != "fp32" else {}),
            "accuracy_check": agree[key], "rounds": rounds, **env, "load_avg_1m": round(os.getloadavg()[0], 2),
        })
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument("--case", type=int, help="run only this case (index into CASES) in this process")
    add_malloc_option(parser)
    args = parser.parse_args()
    if args.case is None:  # every case in a fresh process of its own, one after the other
        for i in range(len(CASES)):
            cmd = [sys.executable, __file__, "--case", str(i), "--malloc", args.malloc]
            cmd += ["--quick"] if args.quick else []
            if subprocess.run(cmd).returncode:
                return 1
        return 0
    torch.set_num_threads(default_threads())
    import onnxruntime

    kept = apply_malloc_option(args.malloc)
    env = {**machine(), "onnxruntime": onnxruntime.__version__, "malloc": "kept" if kept else "default"}
    np.random.seed(0)
    name, size, batch, rounds = CASES[args.case]
    for line in run_case(name, size, batch, max(2, rounds // 3) if args.quick else rounds, env):
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
