"""Recipes and strict overrides; a non-finite loss stops cleanly; the run directory holds what it promises."""

from __future__ import annotations

import json
import stat

import pytest
import torch
import yaml
from safetensors.torch import load_file

from resnet import artifacts
from resnet.cli import main
from resnet.errors import UserError
from resnet.train import checkpoint, list_recipes, load_recipe, outputs, train
from test_train_helpers import tiny_overrides

PAPER_CIFAR = [f"cifar10-resnet{n}" for n in (20, 32, 44, 56, 110, 1202)] + \
              [f"cifar10-plain{n}" for n in (20, 32, 44, 56, 110)]
PAPER_IMAGENET = [f"imagenet-{n}" for n in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                                            "plain18", "plain34")]


def test_every_promised_recipe_ships_and_loads():
    assert set(PAPER_CIFAR + PAPER_IMAGENET + ["quickstart", "cifar10-fast"]) <= set(list_recipes())


@pytest.mark.parametrize("name", PAPER_CIFAR)
def test_cifar_recipes_are_section_4_2(name):
    c = load_recipe(name)
    assert c.paper and (c.batch_size, c.lr, c.momentum, c.weight_decay) == (128, 0.1, 0.9, 1e-4)
    assert (c.schedule, c.milestones, c.lr_decay, c.max_iters) == ("multistep", [32000, 48000], 0.1, 64000)
    assert (c.val_size, c.augment, c.label_smoothing, c.ema_decay, c.tta_flip) == (5000, "cifar", 0, 0, False)
    assert c.arch == name.split("-")[1]
    warm = name in ("cifar10-resnet110", "cifar10-resnet1202")
    assert (c.warmup_lr, c.warmup_until_train_err) == ((0.01, 0.8) if warm else (0.0, 0.8))


@pytest.mark.parametrize("name", PAPER_IMAGENET)
def test_imagenet_recipes_are_section_3_4(name):
    c = load_recipe(name)
    assert (c.batch_size, c.lr, c.momentum, c.weight_decay, c.max_iters) == (256, 0.1, 0.9, 1e-4, 600000)
    # Table 2 compares plain and residual 18/34 with option A (no extra parameters); 50-152 use B (Sec. 4.1).
    shortcut = None if "plain" in name else ("A" if name.endswith(("resnet18", "resnet34")) else "B")
    assert (c.schedule, c.augment, c.shortcut) == ("plateau", "imagenet", shortcut)


def test_fast_recipe_says_it_is_not_the_paper():
    assert not load_recipe("cifar10-fast").paper and not load_recipe("quickstart").paper


@pytest.mark.parametrize("override, words", [
    ("lrr=0.1", ["unknown setting 'lrr'", "lr"]),
    ("max_iter=5", ["unknown setting 'max_iter'", "max_iters"]),
    ("learning_rate=0.1", ["unknown setting 'learning_rate' (did you mean lr?)"]),  # used to suggest variant
    ("epochs=30", ["unknown setting 'epochs' (did you mean max_iters (iterations, not epochs)?)"]),
    ("batch_size=1.5", ["'batch_size' must be int", "1.5"]),
    ("lr=fast", ["'lr' must be float", "fast"]),
    ("channels_last=2", ["'channels_last' must be bool"]),
    ("milestones=[1,a]", ["'milestones' must be a list of int"]),
    ("milestones=[1.5]", ["'milestones' must be a list of int", "1.5"]),
    ("milestones=[100,100]", ["'milestones' must be strictly increasing", "[100, 100]"]),
    ("milestones=[-5]", ["'milestones' must be strictly increasing", "at least 1"]),
    ("momentum=1.5", ["'momentum' must be below 1", "1.5"]),
    ("seed=-1", ["'seed' must be a whole number from 0"]),
    ("data_seed=-1", ["'data_seed' must be a whole number from 0"]),
    ("seed=99999999999999999999", ["'seed' must be a whole number from 0"]),
    # YAML 1.1 would read these as octal (26624), base 60 (90) and hex (64): refused, not reinterpreted.
    ("max_iters=064000", ["'max_iters' must be int", "064000"]),
    ("eval_every=1:30", ["'eval_every' must be int", "1:30"]),
    ("batch_size=0x40", ["'batch_size' must be int", "0x40"]),
    # Model settings are checked with the rest, before any data is read.
    ("arch=resnet5O", ["unknown model 'resnet5O'", "resnet50"]),
    ("shortcut=D", ["shortcut must be one of A, B, C", "'D'"]),
    ("data=", ["'data' is empty"]),
    ("precision=fp8", ["'precision' must be one of fp32, bf16, fp16"]),
    ("lr", ["not of the form key=value"]),
    ("threads=-1", ["'threads' must be at least 1", "-1"]),
    ("num_workers=-2", ["'num_workers' must be at least 0", "-2"]),
    ("momentum=-0.9", ["'momentum' must not be negative"]),
    ("weight_decay=-1e-4", ["'weight_decay' must not be negative"]),
    ("momentum=0", ["'nesterov' needs a positive momentum"]),  # with nesterov=true added below
    ("mean=[0.5,0.5]", ["'mean' needs one value per input channel (3)"]),
    ("std=[0.2,0,0.2]", ["'std' is in 0-1 pixel units and positive"]),
    ("mean=[123.675,116.28,103.53]", ["'mean' is in 0-1 pixel units", "divide 0-255 values by 255"]),
    ("lr_decay=-1", ["'lr_decay'", "(0, 1]", "-1"]),
    ("lr_decay=10", ["'lr_decay'", "0.1 divides it by 10"]),
    ("warmup_lr=-0.1", ["'warmup_lr' must not be negative"]),
    ("min_lr=-1", ["'min_lr' must not be negative"]),
    ("ramp_iters=-5", ["'ramp_iters' must not be negative"]),
    ("warmup_until_train_err=5", ["'warmup_until_train_err'", "(0, 1]"]),
    ("plateau_patience=0", ["'plateau_patience'", "at least 1"]),
    ("eval_view=centr", ["'eval_view' must be one of", "center"]),
])
def test_bad_overrides_are_one_sentence_naming_the_key(override, words):
    with pytest.raises(UserError) as err:
        load_recipe("cifar10-resnet20", ["nesterov=true", override] if override == "momentum=0" else [override])
    message = str(err.value)
    assert all(w in message for w in words), message
    assert "\n" not in message and message.endswith(".")


def test_good_overrides_are_typed():
    c = load_recipe("cifar10-resnet20", ["lr=1", "milestones=[10, 20]", "val_size=null", "data=123"])
    assert c.lr == 1.0 and isinstance(c.lr, float) and c.milestones == [10, 20] and c.val_size is None
    assert c.data == "123"
    # Exponents without a dot, which YAML 1.1 reads as text, are floats, on the command line and in files.
    assert load_recipe("cifar10-resnet20", ["weight_decay=5e-4", "lr=1E-2"]).weight_decay == 5e-4
    assert load_recipe("cifar10-resnet20", ["lr=1E-2"]).lr == 0.01


def test_unknown_recipe_suggests_the_closest(capsys):
    assert main(["train", "--recipe", "cifar10-resnet21"]) == 2
    err = capsys.readouterr().err
    assert "unknown recipe 'cifar10-resnet21'" in err and "cifar10-resnet20" in err and "Traceback" not in err


def test_recipe_files_read_numbers_as_written_and_refuse_repeated_keys(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("arch: resnet20\nmax_iters: 64000\nval_size: 5000\nmilestones: [32000, 48000]\n")
    c = load_recipe(str(path))
    assert (c.max_iters, c.val_size, c.milestones) == (64000, 5000, [32000, 48000])
    path.write_text("arch: resnet20\nval_size: 05000\n")  # YAML 1.1: octal 2560
    with pytest.raises(UserError, match="'val_size' must be int or null, not '05000'"):
        load_recipe(str(path))
    path.write_text("arch: resnet20\nlr: 0.1\nmomentum: 0.9\nlr: 0.5\n")  # YAML: the last one wins, silently
    with pytest.raises(UserError, match="not valid YAML .*the key 'lr' is given twice"):
        load_recipe(str(path))


def test_recipe_names_directories_and_files_in_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(UserError, match="recipe '.*dir.yaml' is a directory"):
        load_recipe(str(tmp_path / "dir.yaml"))
    # A shipped recipe's name means that recipe, even beside a file of that name; ./NAME is the file.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart").write_text("arch: resnet20\nlr: 0.7\n")
    assert load_recipe("quickstart").lr != 0.7 and load_recipe("quickstart").data == "digits"
    assert load_recipe("./quickstart").lr == 0.7
    # ... and beside a folder of that name: `--recipe quickstart --out quickstart` run twice (to resume) was
    # refused the second time as "a directory".
    (tmp_path / "cifar10-fast").mkdir()
    assert load_recipe("cifar10-fast").recipe == "cifar10-fast"
    with pytest.raises(UserError, match="recipe './cifar10-fast' is a directory"):
        load_recipe("./cifar10-fast")
    (tmp_path / "curves.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x80\xff")
    with pytest.raises(UserError, match="recipe file 'curves.png' is not text"):
        load_recipe("curves.png")


def test_milestones_past_the_end_are_pointed_out(tmp_path, capsys):
    train(load_recipe("cifar10-resnet20", tiny_overrides(max_iters=4, milestones=[3, 8])), tmp_path / "a")
    assert "lr milestones [8] are not before max_iters 4" in capsys.readouterr().err
    train(load_recipe("cifar10-resnet20", tiny_overrides(max_iters=4, milestones=[3])), tmp_path / "b")
    assert "milestones" not in capsys.readouterr().err


def test_train_takes_data_dir_and_cache_dir_flags_as_written(tmp_path):
    import argparse

    from resnet.commands.train import add_arguments, resolve

    weird = str(tmp_path / "my data #2")  # YAML would read ' #2' as a comment
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--recipe", "quickstart", "--data-dir", weird, "--cache-dir", weird, "--data", weird,
                              "lr=0.05"])
    cfg, out = resolve(args)
    assert (cfg.data_dir, cfg.cache_dir, cfg.data, cfg.lr) == (weird, weird, weird, 0.05)
    assert out.as_posix() == "runs/quickstart"


def test_recipe_file_with_unknown_key_fails(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("arch: resnet20\nweight_decai: 0.1\n")
    with pytest.raises(UserError, match="unknown setting 'weight_decai'.*weight_decay"):
        load_recipe(str(path))


def test_nan_loss_stops_with_a_message_and_never_writes_bad_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("RESNET_TEST_NAN_AT", "7")
    cfg = load_recipe("cifar10-resnet20", tiny_overrides(checkpoint_every=3))
    with pytest.raises(UserError, match="non-finite at iteration 7.*last good checkpoint: iteration 6"):
        train(cfg, tmp_path)
    with pytest.raises(UserError, match="non-finite at iteration 2 .*no checkpoint was written yet"):
        monkeypatch.setenv("RESNET_TEST_NAN_AT", "2")
        train(cfg, tmp_path / "early")
    state = checkpoint.load(tmp_path / checkpoint.NAME)
    assert state["iteration"] == 6 and checkpoint.all_finite(state["model"])
    assert not (tmp_path / "model.safetensors").exists() and not (tmp_path / "summary.json").exists()


def test_checkpoint_refuses_non_finite_weights(tmp_path):
    with pytest.raises(RuntimeError, match="non-finite"):
        checkpoint.save(tmp_path / "c.pt", {"model": {"w": torch.tensor([1.0, float("inf")])}})
    assert not list(tmp_path.iterdir())


def test_run_directory_holds_every_output(tmp_path):
    cfg = load_recipe("cifar10-resnet20", tiny_overrides(precision="bf16", channels_last=True, ema_decay=0.9,
                                                         tta_flip=True, log_every=4))
    summary = train(cfg, tmp_path)
    for name in ("config.yaml", "metrics.jsonl", "curves.png", "checkpoint.pt", "model.safetensors",
                 "model.json", "summary.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["precision"] == "bf16"
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["iter"] for m in lines if m["split"] == "train"] == [4, 8, 12]
    assert [m["iter"] for m in lines if m["split"] == "val"] == [6, 12]
    # With EMA on, each validation line also scores the trained weights, and the summary says both.
    assert all(0 <= m["trained_top1_err"] <= 1 for m in lines if m["split"] == "val")
    assert summary["val_top1_err_trained"] == [m for m in lines if m["split"] == "val"][-1]["trained_top1_err"]
    assert summary["test_top1_err_trained"] == [m for m in lines if m["split"] == "test"][-1]["trained_top1_err"]
    assert all({"iter", "epoch", "split", "loss", "top1_err", "top5_err", "lr"} <= m.keys() for m in lines)
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["arch"] == "resnet20" and meta["classes"] == [str(i) for i in range(10)]
    assert meta["input_size"] == [1, 8, 8] and meta["metrics"]["test_top1_err"] == summary["test_top1_err"]
    weights = load_file(tmp_path / "model.safetensors")
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in weights)
    for key in ("val_top1_err", "test_top1_err", "iterations", "wall_s", "images_per_s", "skipped"):
        assert summary[key] is not None, key
    assert summary["iterations"] == 12 and 0 <= summary["test_top1_err"] <= 1


def test_fp16_on_cpu_is_refused_with_a_sentence(tmp_path):
    cfg = load_recipe("cifar10-resnet20", tiny_overrides(precision="fp16", device="cpu"))
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        train(cfg, tmp_path)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_without_bf16_units_says_it_is_emulated(tmp_path, monkeypatch, capsys, native):
    import resnet.machine

    monkeypatch.setattr(resnet.machine, "has_native_bf16", lambda cpuinfo=None: native)
    train(load_recipe("cifar10-resnet20", tiny_overrides(precision="bf16", device="cpu", max_iters=1)), tmp_path)
    said = "bf16 is emulated here and trains about 10x slower than fp32" in capsys.readouterr().err
    assert said is not native


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_path_trains_in_every_precision(tmp_path, precision):
    cfg = load_recipe("cifar10-resnet20", tiny_overrides(device="cuda", precision=precision, channels_last=True))
    summary = train(cfg, tmp_path)
    assert summary["device"].startswith("cuda") and summary["iterations"] == 12
    assert checkpoint.all_finite(load_file(tmp_path / "model.safetensors"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_run_resumes_from_its_checkpoint(tmp_path):
    """The checkpoint's random-number states are CPU tensors whatever the device; loading it onto the GPU
    used to hand set_rng_state a CUDA tensor. A finished run without its summary resumes and finishes."""
    cfg = load_recipe("cifar10-resnet20", tiny_overrides(device="cuda"))
    first = train(cfg, tmp_path)
    (tmp_path / "summary.json").unlink()
    again = train(cfg, tmp_path)
    assert again["iterations"] == first["iterations"] == 12 and again["test_top1_err"] == first["test_top1_err"]


def test_outputs_are_readable_like_other_files_and_stale_temporaries_are_removed(tmp_path, monkeypatch):
    """Atomic writes used mkstemp's private 0600 mode; they now follow the umask like any written file
    (the process's, read once at import)."""
    monkeypatch.setattr(artifacts, "_UMASK", 0o022)
    artifacts.atomic_write_bytes(tmp_path / "a.json", b"{}")
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    for name in (".checkpoint.pt.x1.tmp", ".curves.png.tmp.png"):  # left by processes killed mid-write
        (tmp_path / name).write_bytes(b"partial")
    checkpoint.remove_stale_temps(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_resumed_log_drops_the_lines_after_the_checkpoint_and_the_test_line(tmp_path):
    """A run killed inside finish() after its test line had been written repeats finish() on the rerun:
    the old test line goes, so the log holds one."""
    lines = [{"iter": 6, "split": "train", "top1_err": 0.5}, {"iter": 12, "split": "val", "top1_err": 0.4},
             {"iter": 12, "split": "test", "top1_err": 0.4}, {"iter": 13, "split": "train", "top1_err": 0.3}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines) + '{"iter": 1')
    outputs.RunLog(tmp_path, resume_iter=12).close()
    assert outputs.read_metrics(tmp_path / "metrics.jsonl") == lines[:2]


def test_tensorboard_shows_each_step_once_after_a_restart_and_after_a_resume(tmp_path):
    """A first attempt that died before its first checkpoint starts again from scratch: its old points go,
    as its metrics.jsonl lines do. A resumed run drops the points after its checkpoint."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def attempt(resume_iter, iters):
        log = outputs.RunLog(tmp_path, resume_iter=resume_iter)
        for it in iters:
            log.write({"iter": it, "split": "train", "loss": float(it)})
        log.close()

    # The event files' counter goes 9, 10, 11 over the three attempts: as text, "10" sorts before "9", which
    # once made TensorBoard read the attempts out of order when all three began in the same second.
    from tensorboard.summary.writer import event_file_writer

    counter = event_file_writer._global_uid
    while counter._value < 10 ** len(str(counter._value)) - 1:  # to 9 (or 99, ...): the next names cross
        counter.get()
    attempt(None, [2, 4, 6])      # died at 7, no checkpoint
    attempt(None, [2, 4, 6, 8])   # killed at 9, checkpoint at 4
    attempt(4, [6, 8, 10])
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(s, s) for s in (2, 4, 6, 8, 10)]


def test_strict_data_reaches_the_loaders(tmp_path):
    """--strict (strict_data) used to apply only to the scan: a streamed file breaking mid-run was skipped."""
    from test_train_helpers import FakeData

    seen = []

    class Recording(FakeData):
        def make_loader(self, split, batch_size, **kwargs):
            seen.append(kwargs.get("strict"))
            return super().make_loader(split, batch_size, **kwargs)

    overrides = tiny_overrides(max_iters=2, eval_every=2, in_chans=3, strict_data=True)
    train(load_recipe("cifar10-resnet20", overrides), tmp_path, data_api=Recording())
    assert seen and all(s is True for s in seen)


def test_a_plateau_schedule_without_a_validation_split_is_refused_before_training(tmp_path):
    # it would keep the first lr for the whole run, silently
    with pytest.raises(UserError, match="schedule=plateau .* has no validation split; give it one") as err:
        train(load_recipe("cifar10-resnet20", tiny_overrides(schedule="plateau", val_size=0, milestones=[])),
              tmp_path / "run")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
