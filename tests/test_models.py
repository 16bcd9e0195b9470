"""The paper's networks over the whole registry: shapes, gradients, exact counts, layout, options."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx
import torch.nn.functional as F

import resnet
from resnet.artifacts import clean_state_dict
from resnet.complexity import model_cost
from resnet.models import MODELS, PadShortcut, model_spec

ALL = resnet.list_models()
# Small inputs keep the suite fast; global pooling makes the head independent of the input size.
TEST_SIZE = {"imagenet": 32, "cifar": 8}


def _input(name: str, batch: int = 2, in_chans: int = 3) -> torch.Tensor:
    size = TEST_SIZE[model_spec(name).family]
    return torch.randn(batch, in_chans, size, size, generator=torch.Generator().manual_seed(0))


def test_registry_has_the_paper_models():
    expected = {f"resnet{d}" for d in (18, 34, 50, 101, 152, 20, 32, 44, 56, 110, 1202)}
    expected |= {f"plain{d}" for d in (18, 34, 20, 32, 44, 56, 110)}
    assert set(ALL) == expected


@pytest.mark.parametrize("name", ALL)
def test_forward_shape_and_backward_reaches_every_parameter(name):
    torch.manual_seed(0)
    model = resnet.create_model(name, num_classes=7)
    x = _input(name)
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no finite gradient for {missing[:5]}"
    # Every tensor gets a signal: an all-zero gradient would mean a layer is disconnected.
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert not zero, f"zero gradient for {zero[:5]}"


# Exact parameter counts for the default options (1000 classes ImageNet, 10 CIFAR). Arithmetic for
# resnet20: stem 3*16*9 + 32 (BN) = 464; stage 1: 6 convs of 16*16*9 + 6 BN*32 = 14,016; stage 2:
# 16*32*9 + 5*32*32*9 + 6*64 = 51,072; stage 3: 32*64*9 + 5*64*64*9 + 6*128 = 203,520; fc 64*10+10 = 650;
# total 269,722 (option A adds no parameters).
EXACT = {
    "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032, "resnet101": 44_549_160,
    "resnet152": 60_192_808, "resnet20": 269_722, "resnet32": 464_154, "resnet44": 658_586,
    "resnet56": 853_018, "resnet110": 1_727_962, "resnet1202": 19_421_274,
}


@pytest.mark.parametrize("name,count", sorted(EXACT.items()))
def test_exact_parameter_counts(name, count):
    assert sum(p.numel() for p in resnet.create_model(name).parameters()) == count


def test_resnet34_shortcut_options_counts():
    # A drops the three 1x1 projections of B (8,448 + 33,280 + 132,096 = 173,824 parameters);
    # C adds a projection to each of the other 13 blocks (919,168 parameters).
    count = {s: sum(p.numel() for p in resnet.create_model("resnet34", shortcut=s).parameters())
             for s in "ABC"}
    assert count == {"A": 21_623_848, "B": 21_797_672, "C": 22_716_840}


@pytest.mark.parametrize("name,paper_g", [("resnet18", 1.8), ("resnet34", 3.6), ("resnet50", 3.8),
                                          ("resnet101", 7.6), ("resnet152", 11.3)])
def test_macs_match_table1_within_2_percent(name, paper_g):
    macs = model_cost(name)["macs"]
    assert abs(macs / 1e9 - paper_g) / paper_g < 0.02


def test_the_default_cost_table_equals_tracing_every_model():
    # `resnet models` reads DEFAULT_COSTS; it must be what tracing the current architectures gives.
    from resnet.complexity import DEFAULT_COSTS, _traced_cost

    assert set(DEFAULT_COSTS) == set(resnet.list_models())
    traced = {name: _traced_cost(name, ()) for name in DEFAULT_COSTS}
    assert {name: (c["params"], c["macs"]) for name, c in traced.items()} == DEFAULT_COSTS
    assert all(c["params"] == sum(p.numel() for p in resnet.create_model(n).parameters())
               for n, c in traced.items() if n in ("resnet20", "resnet50"))


def test_v15_resnet50_counts_4_1_gmacs():
    # Moving the stride to the 3x3 makes that conv (and the first 1x1) run at the higher resolution.
    assert round(model_cost("resnet50", variant="v1.5")["macs"] / 1e9, 1) == 4.1


def _expected_keys(name: str) -> set[str]:
    """torchvision's state-dict keys, built from its naming rules, independently of our modules."""
    spec = model_spec(name)
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {"conv1.weight", "fc.weight", "fc.bias"} | {f"bn1.{k}" for k in bn}
    convs = 3 if spec.block == "bottleneck" else 2
    in_chs = 64
    for s, repeats in enumerate(spec.layers):
        out_chs = spec.widths[s] * (4 if spec.block == "bottleneck" else 1)
        for i in range(repeats):
            p = f"layer{s + 1}.{i}"
            for c in range(1, convs + 1):
                keys |= {f"{p}.conv{c}.weight"} | {f"{p}.bn{c}.{k}" for k in bn}
            if i == 0 and (s > 0 or in_chs != out_chs):
                keys |= {f"{p}.downsample.0.weight"} | {f"{p}.downsample.1.{k}" for k in bn}
        in_chs = out_chs
    return keys


@pytest.mark.parametrize("name", resnet.list_models("imagenet"))
def test_imagenet_state_dict_uses_torchvision_layout(name):
    keys = set(resnet.create_model(name).state_dict())
    expected = _expected_keys(name) if model_spec(name).residual else {
        k for k in _expected_keys(name) if "downsample" not in k}
    assert keys == expected


def test_torchvision_shapes_for_downsample_and_bottleneck():
    sd = resnet.create_model("resnet50").state_dict()
    assert sd["layer2.0.downsample.0.weight"].shape == (512, 256, 1, 1)
    assert sd["layer1.0.conv3.weight"].shape == (256, 64, 1, 1)
    assert sd["fc.weight"].shape == (1000, 2048)


def _reference_forward(sd: dict, layers: tuple[int, ...], bottleneck: bool, x: torch.Tensor) -> torch.Tensor:
    """torchvision's ResNet written out with torch.nn.functional from a state dict (eval mode, v1.5)."""

    def bn(t, p):
        return F.batch_norm(t, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"],
                            sd[f"{p}.bias"], False, 0.0, 1e-5)

    x = F.relu(bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), "bn1"))
    x = F.max_pool2d(x, 3, 2, 1)
    for s, repeats in enumerate(layers):
        for i in range(repeats):
            p, stride = f"layer{s + 1}.{i}", (2 if s > 0 and i == 0 else 1)
            if bottleneck:
                out = F.relu(bn(F.conv2d(x, sd[f"{p}.conv1.weight"]), f"{p}.bn1"))
                out = F.relu(bn(F.conv2d(out, sd[f"{p}.conv2.weight"], stride=stride, padding=1), f"{p}.bn2"))
                out = bn(F.conv2d(out, sd[f"{p}.conv3.weight"]), f"{p}.bn3")
            else:
                out = F.relu(bn(F.conv2d(x, sd[f"{p}.conv1.weight"], stride=stride, padding=1), f"{p}.bn1"))
                out = bn(F.conv2d(out, sd[f"{p}.conv2.weight"], padding=1), f"{p}.bn2")
            short = x
            if f"{p}.downsample.0.weight" in sd:
                short = bn(F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=stride), f"{p}.downsample.1")
            x = F.relu(out + short)
    return F.linear(x.mean((2, 3)), sd["fc.weight"], sd["fc.bias"])


def _random_state_dict(model: torch.nn.Module, seed: int) -> dict:
    """A torchvision-layout state dict with random (non-default) values, statistics included."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked"):
            out[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            out[k] = torch.rand(v.shape, generator=g) + 0.5
        else:
            out[k] = torch.randn(v.shape, generator=g) * (0.1 if v.dim() > 1 else 0.5)
    return out


@pytest.mark.parametrize("name,bottleneck", [("resnet18", False), ("resnet50", True)])
def test_torchvision_state_dict_loads_strict_and_gives_same_logits(name, bottleneck):
    # torchvision's ResNet-50 is "v1.5": our variant="v1.5" must reproduce it exactly.
    model = resnet.create_model(name, variant="v1.5").eval()
    sd = _random_state_dict(model, seed=1)
    model.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(x)
    ref = _reference_forward(sd, model_spec(name).layers, bottleneck, x)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_wrapper_prefixes_are_stripped():
    sd = {"module.conv1.weight": torch.zeros(1), "_orig_mod.fc.bias": torch.zeros(1),
          "module._orig_mod.layer1.0.bn1.weight": torch.zeros(1)}
    assert set(clean_state_dict(sd)) == {"conv1.weight", "fc.bias", "layer1.0.bn1.weight"}


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet20", "plain20"])
def test_feature_info_matches_the_real_feature_maps(name):
    model = resnet.create_model(name).eval()
    x = _input(name, batch=1)
    feats = model.forward_stages(x)
    assert len(feats) == len(model.feature_info)
    for f, info in zip(feats, model.feature_info, strict=True):
        assert f.shape[1] == info["num_chs"]
        assert x.shape[-1] // f.shape[-1] == info["reduction"]
    with torch.no_grad():
        last = model.forward_features(x)
        torch.testing.assert_close(last, feats[-1])
        torch.testing.assert_close(model.forward_head(last), model(x))
    assert model.forward_head(last, pre_logits=True).shape == (1, model.num_features)


def test_option_a_has_no_shortcut_parameters_and_pads_with_zeros():
    model = resnet.create_model("resnet20")
    assert not [k for k in model.state_dict() if "downsample" in k]
    pads = [m for m in model.modules() if isinstance(m, PadShortcut)]
    assert len(pads) == 2  # the first block of stages 2 and 3
    x = torch.randn(2, 16, 8, 8)
    out = pads[0](x)
    assert out.shape == (2, 32, 4, 4)
    torch.testing.assert_close(out[:, :16], x[:, :, ::2, ::2])
    assert (out[:, 16:] == 0).all()



@pytest.mark.parametrize("name", ["resnet20", "resnet18"])
def test_channels_last_training_writes_every_gradient_in_channels_last(name):
    """A gradient in another layout than its neighbours makes the elementwise backward ops that meet it take
    their slow strided path (3-34x slower per op, measured alone); the option-A shortcut and the global pool
    used to write NCHW gradients into a channels_last step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model = resnet.create_model(name, num_classes=10).to(memory_format=torch.channels_last).train()
    x = _input(name, batch=4).to(memory_format=torch.channels_last)
    loss = F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    other = []

    class Layouts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                # 4-D and more than one pixel: a 1x1 map is in every layout at once
                if isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[-2:].numel() > 1 \
                        and not t.is_contiguous(memory_format=torch.channels_last):
                    other.append((func.__name__, tuple(t.shape), t.stride()))
            return out

    with Layouts():
        loss.backward()
    assert other == []
    # the training head (a pool of the map's size) is the same mean as the evaluation head (adaptive pool)
    feats = model.forward_features(x).detach()
    train_head = model.forward_head(feats)
    model.eval()
    torch.testing.assert_close(train_head, model.forward_head(feats))


def _count_additions(model: torch.nn.Module) -> int:
    graph = torch.fx.symbolic_trace(model).graph
    adds = (operator.add, operator.iadd, torch.add)
    return sum(1 for n in graph.nodes if n.op == "call_function" and n.target in adds)


@pytest.mark.parametrize("name", ["plain20", "plain56", "plain18", "plain34"])
def test_plain_nets_have_no_additions(name):
    assert _count_additions(resnet.create_model(name)) == 0
    residual = resnet.create_model(name.replace("plain", "resnet"))
    assert _count_additions(residual) == sum(model_spec(name).layers)


def test_shortcut_c_projects_every_block_and_b_only_where_shape_changes():
    def projections(model):
        return sum(1 for k in model.state_dict() if k.endswith("downsample.0.weight"))

    assert projections(resnet.create_model("resnet34", shortcut="B")) == 3
    assert projections(resnet.create_model("resnet34", shortcut="C")) == 16
    assert projections(resnet.create_model("resnet50", shortcut="B")) == 4  # layer1 widens 64 -> 256


def test_v1_and_v15_differ_exactly_where_they_should():
    v1, v15 = resnet.create_model("resnet50", variant="v1"), resnet.create_model("resnet50", variant="v1.5")
    assert {k: v.shape for k, v in v1.state_dict().items()} == {k: v.shape for k, v in v15.state_dict().items()}
    diffs = []
    for (name, a), (_, b) in zip(v1.named_modules(), v15.named_modules(), strict=True):
        if isinstance(a, torch.nn.Conv2d) and a.stride != b.stride:
            diffs.append((name, a.stride, b.stride))
    # Only the down-sampling blocks (first block of stages 2-4) move the stride from conv1 to conv2.
    assert sorted(diffs) == sorted(
        [(f"layer{s}.0.conv1", (2, 2), (1, 1)) for s in (2, 3, 4)]
        + [(f"layer{s}.0.conv2", (1, 1), (2, 2)) for s in (2, 3, 4)])
    # Basic-block nets have no 1x1 to move the stride from: both variants are the same network.
    a, b = resnet.create_model("resnet18", variant="v1"), resnet.create_model("resnet18", variant="v1.5")
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x))


def test_zero_init_residual_makes_blocks_start_as_identity():
    model = resnet.create_model("resnet20", zero_init_residual=True).eval()
    block = model.layer1[1]
    assert (block.bn2.weight == 0).all()
    x = torch.relu(torch.randn(1, 16, 8, 8))
    with torch.no_grad():
        torch.testing.assert_close(block(x), x)
    assert (resnet.create_model("resnet20").layer1[1].bn2.weight == 1).all()


def test_he_initialisation_fan_out():
    conv = resnet.create_model("resnet56").layer3[4].conv1  # 64 -> 64, 3x3: fan_out = 576
    assert abs(conv.weight.std().item() - (2 / 576) ** 0.5) < 0.1 * (2 / 576) ** 0.5


def test_in_chans_and_num_classes():
    model = resnet.create_model("resnet20", in_chans=1, num_classes=4)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 4)


def test_unknown_model_names_closest():
    with pytest.raises(resnet.UserError, match=r"unknown model 'resnet51' \(did you mean .*resnet50"):
        resnet.create_model("resnet51")


@pytest.mark.parametrize("options,message", [
    ({"shortcutt": "A"}, r"unknown option 'shortcutt'.*did you mean shortcut"),
    ({"shortcut": "D"}, r"shortcut must be one of A, B, C"),
    ({"variant": "v2"}, r"variant must be 'v1'"),
    ({"num_classes": 0}, r"num_classes must be a positive whole number"),
    ({"in_chans": 2.5}, r"in_chans must be a positive whole number"),
])
def test_bad_options_give_one_sentence(options, message):
    with pytest.raises(resnet.UserError, match=message):
        resnet.create_model("resnet20", **options)


def test_the_network_class_refuses_unknown_stems_and_stage_counts():
    from resnet.models.resnet import ResNet

    with pytest.raises(ValueError, match="stem='cifr'"):  # used to build the CIFAR stem silently
        ResNet("basic", (1, 1, 1), (16, 32, 64), stem="cifr")
    with pytest.raises(ValueError, match="3 or 4 stages"):
        ResNet("basic", (1, 1, 1, 1, 1), (8, 8, 8, 8, 8), stem="cifar")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script is deprecated in PyTorch 2.x
@pytest.mark.parametrize("name", ["resnet20", "resnet50", "plain20"])
def test_torch_jit_script_compiles_the_models(name):
    model = resnet.create_model(name).eval()
    x = _input(name)
    assert torch.equal(torch.jit.script(model)(x), model(x))


def test_plain_nets_refuse_a_shortcut():
    with pytest.raises(resnet.UserError, match="plain network and has no shortcuts"):
        resnet.create_model("plain20", shortcut="B")


def test_every_spec_depth_matches_its_name():
    for name, spec in MODELS.items():
        assert name.endswith(str(spec.depth))
