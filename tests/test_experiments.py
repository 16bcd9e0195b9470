"""`resnet reproduce`: the plans, the response measurement, and a tiny end-to-end run of the quick mode."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import resnet
from resnet.cli import main
from resnet.experiments import Settings, plan_runs, reproduce, response_stds, three_by_three_bns
from resnet.experiments.plan import quick_notes
from resnet.experiments.runner import _headline
from resnet.train import load_recipe


def test_full_degradation_uses_the_paper_recipes_unchanged():
    runs = plan_runs("degradation", Settings(quick=False, data=None))
    assert [r.arch for r in runs] == ["plain20", "resnet20", "plain32", "resnet32", "plain44", "resnet44",
                                      "plain56", "resnet56"]
    r56 = next(r for r in runs if r.arch == "resnet56")
    cfg = load_recipe(r56.recipe, r56.all_overrides())
    assert (cfg.max_iters, cfg.milestones, cfg.batch_size, cfg.lr, cfg.data) == (64000, [32000, 48000], 128, 0.1,
                                                                                 "cifar10")
    plain = next(r for r in runs if r.arch == "plain56")
    assert load_recipe(plain.recipe, plain.all_overrides()).shortcut is None


def test_shortcut_plan_and_seeds():
    runs = plan_runs("shortcuts", Settings(quick=False, data=None, seeds=2))
    assert [(r.arch, r.shortcut, r.seed) for r in runs] == [
        ("resnet32", s, seed) for seed in (0, 1) for s in "ABC"]
    assert len({r.name for r in runs}) == 6


def test_quick_with_data_is_shortened_and_says_so():
    s = Settings(quick=True, data="some/folder")
    runs = plan_runs("degradation", s)
    cfg = load_recipe(runs[0].recipe, runs[0].all_overrides())
    assert cfg.data == "some/folder" and cfg.max_iters == 200 and cfg.warmup_lr == 0.0
    assert cfg.milestones == []  # lr 0.1 throughout, as the report says, without a step past the end


def test_quick_on_a_small_folder_takes_a_val_size_and_quick_on_digits_is_plain_quick(monkeypatch, capsys):
    """A folder of fewer than 1,000 images could not run --quick (its fixed carve of 1,000 left nothing to
    train on, and no option changed it); --data digits ran the CIFAR recipe's crops and a 1,000-image carve."""
    from resnet.cli import main

    s = Settings(quick=True, data="some/folder", val_size=30)
    cfg = load_recipe(plan_runs("degradation", s)[0].recipe, plan_runs("degradation", s)[0].all_overrides())
    assert cfg.val_size == 30 and "with 30 images held out for validation" in quick_notes(s)[0]
    seen = []
    monkeypatch.setattr("resnet.commands.reproduce.reproduce",
                        lambda exp, out, settings, runs_dir: seen.append((settings, runs_dir)) or {"report": "r"})
    assert main(["reproduce", "degradation", "--quick", "--data", "digits"]) == 0
    assert main(["reproduce", "degradation", "--quick"]) == 0
    assert seen[0] == seen[1] and seen[0][0].data is None  # the same trainings, in the same folder
    assert main(["reproduce", "degradation", "--quick", "--data", "f", "--val-size", "30"]) == 0
    assert seen[2][0].val_size == 30 and seen[2][1].endswith("-val30/trainings")
    assert main(["reproduce", "degradation", "--quick", "--val-size", "30"]) == 2
    assert "--val-size sets the --quick settings on --data only" in capsys.readouterr().err


def test_quick_digits_ramp_fits_a_shortened_run():
    """--iters 20 kept the 30-iteration ramp: the lr never reached the 0.1 the report stated."""
    for iters, ramp in ((None, 30), (100, 10), (20, 2), (5, 1)):
        s = Settings(quick=True, data=None, max_iters=iters)
        run = plan_runs("degradation", s)[0]
        cfg = load_recipe(run.recipe, run.all_overrides())
        assert cfg.ramp_iters == ramp and cfg.ramp_iters < cfg.max_iters
        assert any(f"a {ramp}-iteration ramp" in note for note in quick_notes(s))


def test_unknown_experiment_names_the_closest():
    with pytest.raises(resnet.UserError, match="did you mean degradation"):
        plan_runs("degradaton", Settings(quick=True, data=None))


def test_headline_reads_the_direction():
    nets = {"plain20": {"arch": "plain20", "plain": True, "depth": 20, "train_err": 0.10},
            "plain56": {"arch": "plain56", "plain": True, "depth": 56, "train_err": 0.15},
            "resnet20": {"arch": "resnet20", "plain": False, "depth": 20, "train_err": 0.10},
            "resnet56": {"arch": "resnet56", "plain": False, "depth": 56, "train_err": 0.12}}
    assert _headline(nets, plain=True)["shown"] is True
    assert _headline(nets, plain=False)["shown"] is False
    nets["resnet56"]["train_err"] = 0.05
    assert _headline(nets, plain=False) == {"shown": True, "shallow": "resnet20", "deep": "resnet56",
                                            "shallow_err": 0.10, "deep_err": 0.05}


def test_three_by_three_layers_are_found_in_forward_order():
    names = [n for n, _ in three_by_three_bns(resnet.create_model("resnet20"))]
    assert len(names) == 19  # the 3x3 stem and 18 3x3 layers
    assert names[:3] == ["bn1", "layer1.0.bn1", "layer1.0.bn2"] and names[-1] == "layer3.2.bn2"
    # In a bottleneck net only the middle conv of each block is 3x3; the 7x7 stem is not.
    assert [n for n, _ in three_by_three_bns(resnet.create_model("resnet50"))][:2] == ["layer1.0.bn2",
                                                                                        "layer1.1.bn2"]


def test_response_std_is_the_std_of_the_bn_output_over_all_batches():
    torch.manual_seed(0)
    model = resnet.create_model("resnet20", num_classes=3).eval()
    for m in model.modules():  # non-trivial BN statistics so the check means something
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    batches = [(torch.randn(4, 3, 8, 8), None), (torch.randn(3, 3, 8, 8), None)]
    stds = dict(response_stds(model, batches))
    captured = []
    h = model.layer2[1].bn2.register_forward_hook(lambda m, i, o: captured.append(o.detach().clone()))
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    h.remove()
    expected = torch.cat([c.flatten() for c in captured]).double().std(unbiased=False).item()
    assert stds["layer2.1.bn2"] == pytest.approx(expected, rel=1e-9)


@pytest.mark.slow
def test_quick_degradation_and_responses_end_to_end(tmp_path, capsys):
    s = Settings(quick=True, data=None, depths=(20, 32), max_iters=6)
    runs_dir = tmp_path / "trainings"
    result = reproduce("degradation", tmp_path / "deg", s, runs_dir=runs_dir)
    report = (tmp_path / "deg" / "report.md").read_text()
    assert "Reduced settings (`--quick`)" in report and "6 iterations of batch 64" in report
    assert "| plain32 | 32 |" in report and "| resnet20 | 20 |" in report
    assert (tmp_path / "deg" / "degradation.png").stat().st_size > 10_000
    assert set(result["headline"]) == {"plain", "residual"}
    assert result["nets"]["resnet20"]["params"] == 269_722 - 2 * 16 * 9  # 1 input channel: stem 16*9, not 16*27
    summaries = {p.parent.name: p.stat().st_mtime for p in runs_dir.glob("*/summary.json")}
    assert len(summaries) == 4

    # The responses experiment needs the same networks: it reuses the finished trainings.
    res = reproduce("responses", tmp_path / "resp", s, runs_dir=runs_dir)
    assert {p.parent.name: p.stat().st_mtime for p in runs_dir.glob("*/summary.json")} == summaries
    assert [len(res["stds"][a]) for a in ("plain20", "resnet20", "plain32", "resnet32")] == [19, 19, 31, 31]
    assert all(v > 0 for v in res["stds"]["resnet32"])
    assert "responses.png" in (tmp_path / "resp" / "report.md").read_text()
    assert "before ReLU and addition, on the test split" in (tmp_path / "resp" / "report.md").read_text()
    saved = json.loads((tmp_path / "resp" / "results.json").read_text())
    assert saved["experiment"] == "responses" and saved["quick"] is True and saved["split"] == "test"


def test_bad_depths_are_one_sentence(capsys):
    assert main(["reproduce", "degradation", "--quick", "--depths", "20,21"]) == 2
    assert "depth 21 has no CIFAR network" in capsys.readouterr().err


def test_zero_iterations_is_refused_before_anything_runs(tmp_path, monkeypatch, capsys):
    """--iters 0 was read as "not given" and started the eight trainings of the quick experiment."""
    import resnet.train as train_mod

    def started(cfg, out):
        raise AssertionError(f"a training started with max_iters={cfg.max_iters}")

    monkeypatch.setattr(train_mod, "train", started)
    assert main(["reproduce", "degradation", "--quick", "--iters", "0", "--out", str(tmp_path / "x")]) == 2
    assert "--iters must be at least 1" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_table6_best_is_the_least_error_and_the_paper_column_only_beside_cifar10(tmp_path):
    """'best val error' used to be the mean over seeds, and digits errors stood beside the paper's CIFAR-10."""
    from resnet.experiments.runner import _command, _table6

    for quick, paper_cell in ((False, "| 8.75 |"), (True, "| – |")):
        s = Settings(quick=quick, data=None, seeds=2, depths=(20,))
        runs = plan_runs("table6", s)
        summaries = {r.name: {"status": "finished", "val_top1_err": e} for r, e in zip(runs, (0.10, 0.20), strict=True)}
        body, results = _table6(runs, summaries, tmp_path, tmp_path, s)
        row = next(line for line in body.splitlines() if line.startswith("| resnet20 |"))
        assert "| 10.00 | 15.00 ± 7.07 |" in row and row.endswith(paper_cell), row
        assert "ResNet-1202 (7.93% in the paper) is not in this run" in body and results["split"] == "val"
    # The re-run line names --out only when the user chose the folder (else the default layout is reused).
    assert "--out" not in _command("table6", s, None)
    assert f"--out {tmp_path / 'x'} " in _command("table6", s, tmp_path / "x")


def test_an_interrupted_training_stops_the_experiment_before_any_analysis(tmp_path, monkeypatch, capsys):
    """One SIGTERM used to skip to the next network, and the report mixed in the half-trained one."""
    import resnet.train as train_mod

    calls = []

    def stopped(cfg, out):
        calls.append(out)
        return {"status": "interrupted", "iterations": 3}

    monkeypatch.setattr(train_mod, "train", stopped)
    res = reproduce("degradation", tmp_path / "deg", Settings(quick=True, data=None, depths=(20, 32)),
                    runs_dir=tmp_path / "t")
    assert res["status"] == "interrupted" and len(calls) == 1 and not (tmp_path / "deg" / "report.md").exists()


def test_full_responses_trains_the_networks_of_fig7_only():
    runs = plan_runs("responses", Settings(quick=False, data=None))
    assert [r.arch for r in runs] == ["plain20", "resnet20", "plain56", "resnet56", "resnet110"]
    asked = plan_runs("responses", Settings(quick=False, data=None, depths=(110,)))
    assert [r.arch for r in asked] == ["plain110", "resnet110"]  # depths the user names are trained both ways


def test_default_layout_keeps_other_data_and_iterations_apart(tmp_path, monkeypatch):
    from resnet.commands.reproduce import default_base

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a" / "cifar10").mkdir(parents=True)
    (tmp_path / "b" / "cifar10").mkdir(parents=True)
    bases = [default_base(False, None, None), default_base(True, None, None), default_base(True, None, 50),
             default_base(True, "digits", None), default_base(True, "a/cifar10", None),
             default_base(True, "b/cifar10", None), default_base(False, "cifar100", None)]
    assert bases[:2] == ["runs/reproduce", "runs/reproduce-quick"]
    assert len(set(bases)) == len(bases)
    assert default_base(False, "cifar10", None) == "runs/reproduce"  # the default source named
    assert default_base(True, str(tmp_path / "a" / "cifar10") + "/", None) == bases[4]  # one folder, one name
    assert all(b.startswith("runs/") and "/" not in b[len("runs/"):] for b in bases)


def test_the_papers_cifar10_errors_are_shown_only_beside_cifar10_results():
    """'cifar10' in 'cifar100' used to put CIFAR-10's Table 6 errors beside CIFAR-100 results; the
    degradation report showed them for any data."""
    from resnet.experiments.runner import _paper_figures_apply

    full = {d: _paper_figures_apply(Settings(quick=False, data=d)) for d in
            (None, "cifar10", "/work/shared/data/cifar10", "data/CIFAR-10", "cifar100", "/data/cifar100",
             "/data/photos", "/data/cifar10/../flowers")}
    assert full == {None: True, "cifar10": True, "/work/shared/data/cifar10": True, "data/CIFAR-10": True,
                    "cifar100": False, "/data/cifar100": False, "/data/photos": False,
                    "/data/cifar10/../flowers": False}
    assert not _paper_figures_apply(Settings(quick=True, data=None))
