"""Exact resume: a run killed (SIGKILL, at random steps and during a checkpoint write) or stopped (SIGTERM)
and run again ends with the same weights and the same per-step losses as an uninterrupted run, bit for bit.

Each run is a real subprocess, so a kill is a real kill; the data is the embedded digits set through
resnet.data, with the paper's pad-crop-flip augmentation (so the augmentation's random state is resumed too).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from resnet.train import checkpoint
from test_train_helpers import tiny_overrides

TESTS = Path(__file__).resolve().parent
RUNNER = f"""
import sys, json
sys.path.insert(0, {str(TESTS)!r})
from resnet.errors import UserError
from resnet.train import load_recipe, train
try:
    print(json.dumps(train(load_recipe("cifar10-resnet20", json.loads(sys.argv[2])), sys.argv[1])))
except UserError as err:
    print(err, file=sys.stderr)
    sys.exit(2)
"""
OVERRIDES = tiny_overrides(max_iters=24, milestones=[16], eval_every=8, checkpoint_every=5)


def _start(out: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RUNNER, str(out), json.dumps(OVERRIDES)],
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _finish(out: Path) -> dict:
    proc = _start(out)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    return json.loads(stdout.strip().splitlines()[-1])


def _last_train_iter(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    iters = [json.loads(line)["iter"] for line in path.read_text().splitlines()
             if line.endswith("}") and '"train"' in line]
    return max(iters, default=0)


def _wait(proc: subprocess.Popen, ready, timeout: float = 90) -> None:
    t0 = time.time()
    while not ready():
        assert proc.poll() is None, f"run ended before the kill point: {proc.communicate()[1]}"
        assert time.time() - t0 < timeout, "timed out waiting for the kill point"
        time.sleep(0.01)


def _kill_at_step(out: Path, step: int) -> None:
    proc = _start(out)
    _wait(proc, lambda: _last_train_iter(out) >= step)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _record(out: Path) -> tuple[dict, list]:
    weights = load_file(out / "model.safetensors")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [(m["iter"], m["split"], m["loss"], m["top1_err"], m["lr"]) for m in lines]
    return weights, steps


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("uninterrupted")
    return out, _finish(out)


def _assert_same(out: Path, reference) -> None:
    weights, steps = _record(out)
    ref_weights, ref_steps = _record(reference[0])
    assert steps == ref_steps  # every per-step loss, error and lr, zero tolerance
    assert weights.keys() == ref_weights.keys()
    for key, value in ref_weights.items():
        assert value.dtype == weights[key].dtype and bool((value == weights[key]).all()), key


@pytest.mark.slow
def test_sigkill_at_random_steps_and_during_checkpoint_write_resumes_bit_for_bit(tmp_path, reference):
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    out = tmp_path / "run"
    first = rng.randrange(6, 10)  # after the first checkpoint (iteration 5)
    _kill_at_step(out, first)
    assert checkpoint.load(out / checkpoint.NAME)["iteration"] == 5, f"seed {seed}"

    # Killed while writing the next checkpoint: the previous one must survive whole.
    proc = _start(out, {"RESNET_TEST_CHECKPOINT_SLEEP": "60"})
    _wait(proc, lambda: any(out.glob(".checkpoint.pt.*.tmp")))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.load(out / checkpoint.NAME)["iteration"] == 5, f"seed {seed}"

    _kill_at_step(out, rng.randrange(12, 20))
    summary = _finish(out)
    assert summary["status"] == "finished" and summary["iterations"] == 24
    _assert_same(out, reference)


@pytest.mark.slow
def test_sigterm_checkpoints_at_a_step_boundary_and_exits_zero(tmp_path, reference):
    out = tmp_path / "run"
    proc = _start(out)
    _wait(proc, lambda: _last_train_iter(out) >= 7)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "stopped by SIGTERM" in stderr and "resume" in stderr
    state = checkpoint.load(out / checkpoint.NAME)
    stopped_at = json.loads(stdout.strip().splitlines()[-1])["iterations"]
    assert state["iteration"] == stopped_at == _last_train_iter(out)  # log_every=1: the step's own line
    assert (state["epoch"], state["batch"]) == divmod(stopped_at, (1437 - 96) // 16)
    assert not (out / "summary.json").exists()
    _finish(out)
    _assert_same(out, reference)


@pytest.mark.slow
def test_sigterm_to_the_process_group_of_a_streamed_run_still_checkpoints(tmp_path):
    """A scheduler (Slurm's scancel, a time limit) signals every process of the job: the loading workers of a
    streamed folder too. They leave the signal to the trainer, which finishes its step and checkpoints."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "data" / "train" / c).mkdir(parents=True)
        for k in range(12):  # sizes differ, so the folder is streamed through the loading workers
            size = (20 + k, 24 + (k % 3))
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(tmp_path / "data" / "train"
                                                                                   / c / f"{k}.png")
    out = tmp_path / "run"
    settings = {"data": str(tmp_path / "data"), "augment": "imagenet", "eval_view": "center", "val_size": None,
                "batch_size": 8, "ref_batch_size": 8, "max_iters": 400, "milestones": [], "log_every": 1,
                "eval_every": 100, "checkpoint_every": 100, "num_workers": 2, "eval_batch_size": 16, "in_chans": 3}
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, str(out), json.dumps(tiny_overrides(**settings))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait(proc, lambda: _last_train_iter(out) >= 3)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "stopped by SIGTERM" in stderr
    assert checkpoint.load(out / checkpoint.NAME)["iteration"] == _last_train_iter(out) >= 3


def test_finished_run_is_not_retrained(reference):
    out, first = reference
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    again = _finish(out)
    assert again == first and (out / "model.safetensors").stat().st_mtime_ns == stamp


def test_layout_may_change_between_a_run_and_its_resumption_but_the_math_may_not(tmp_path):
    from resnet.errors import UserError
    from resnet.train import load_recipe, train

    out = tmp_path / "run"
    first = train(load_recipe("cifar10-resnet20", tiny_overrides(max_iters=4, eval_every=4,
                                                                   channels_last=False)), out)
    # A finished run is returned, not retrained, under the other layout...
    again = train(load_recipe("cifar10-resnet20", tiny_overrides(max_iters=4, eval_every=4)), out)
    assert again == first
    # ...and its checkpoint loads under it (the summary gone, the run resumes from its last step).
    (out / "summary.json").unlink()
    resumed = train(load_recipe("cifar10-resnet20", tiny_overrides(max_iters=4, eval_every=4)), out)
    assert resumed["iterations"] == 4 and resumed["val_top1_err"] == pytest.approx(first["val_top1_err"], abs=0.02)
    with pytest.raises(UserError, match="different settings.*lr"):
        train(load_recipe("cifar10-resnet20", tiny_overrides(max_iters=4, eval_every=4, lr=0.07)), out)


def _tiny(**extra):
    from resnet.train import load_recipe

    return load_recipe("cifar10-resnet20", tiny_overrides(**{"max_iters": 4, "eval_every": 4, **extra}))


def test_a_folder_holding_another_runs_outputs_is_never_overwritten(tmp_path):
    """Without its checkpoint (deleted to save space), a finished run's folder used to be taken over by a
    run with other settings: metrics emptied, config rewritten, and later the old summary returned."""
    from resnet.errors import UserError
    from resnet.train import train

    out = tmp_path / "run"
    train(_tiny(), out)
    (out / checkpoint.NAME).unlink()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(UserError, match=r"holds a run with different settings \(lr\).*new --out folder"):
        train(_tiny(lr=0.07), out)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert train(_tiny(), out)["status"] == "finished"  # the same settings still get their summary
    # Outputs copied without their config.yaml were overwritten too (metrics emptied, weights replaced).
    (out / "config.yaml").unlink()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    held = r"summary.json, model.safetensors, metrics.jsonl, model.json, curves.png"
    with pytest.raises(UserError, match=rf"holds {held} but no config.yaml"):
        train(_tiny(), out)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # With a checkpoint, its own recorded settings decide: the same command still takes the run up again.
    resumable = tmp_path / "resumable"
    train(_tiny(), resumable)
    for name in ("config.yaml", "summary.json"):
        (resumable / name).unlink()
    assert train(_tiny(), resumable)["status"] == "finished"


@pytest.mark.parametrize("text", ["- a\n", "", "a: [\n", "name: myproject\n", "\x80\x81"])
def test_a_config_yaml_that_is_not_a_runs_is_one_sentence(tmp_path, text):
    """A list, an empty file, bad YAML or another tool's config.yaml in --out gave tracebacks, or 'unknown
    setting' as if the user's override were wrong."""
    from resnet.errors import UserError
    from resnet.train import train

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_bytes(text.encode("latin-1"))
    with pytest.raises(UserError, match=r"config.yaml' is not the config of a resnet run.*new --out folder") as err:
        train(_tiny(), tmp_path / "run")
    assert "\n" not in str(err.value)
    assert (tmp_path / "run" / "config.yaml").read_bytes() == text.encode("latin-1")


def test_a_second_process_on_the_same_folder_is_refused_while_the_first_holds_it(tmp_path):
    import fcntl

    from resnet.errors import UserError
    from resnet.train import train

    out = tmp_path / "run"
    out.mkdir()
    (out / ".checkpoint.pt.live.tmp").write_bytes(b"the first process is writing this")
    with open(out / ".lock", "a+") as held:  # what the first process holds for its whole run
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UserError, match="another training process is using"):
            train(_tiny(), out)
        assert (out / ".checkpoint.pt.live.tmp").exists()  # its write in flight is left alone
    assert train(_tiny(), out)["iterations"] == 4  # released (as when that process ends or dies): runs


def test_an_unusable_run_folder_is_one_sentence(tmp_path, capsys):
    from resnet.cli import main

    (tmp_path / "file").write_text("not a folder")
    rc = main(["train", "--recipe", "cifar10-resnet20", "--out", str(tmp_path / "file"),
               *tiny_overrides(max_iters=4, eval_every=4)])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot use" in err and "choose a writable --out" in err and "Traceback" not in err


def test_a_failed_checkpoint_write_stops_with_a_sentence_and_keeps_the_previous_one(tmp_path, monkeypatch):
    import errno

    from resnet.errors import UserError
    from resnet.train import train

    real_save = checkpoint.save

    def save(path, state):
        if state["iteration"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(path, state)

    monkeypatch.setattr(checkpoint, "save", save)
    with pytest.raises(UserError, match="No space left on device.*intact.*resume.*iteration 3"):
        train(_tiny(max_iters=8, checkpoint_every=3), tmp_path)
    assert checkpoint.load(tmp_path / checkpoint.NAME)["iteration"] == 3


def test_weights_that_turn_non_finite_under_a_finite_loss_stop_before_any_checkpoint(tmp_path, monkeypatch):
    import torch

    from resnet.errors import UserError
    from resnet.train import loop, train

    step = loop.Trainer.step

    def poisoned(self, x, y, stop):  # an overflowing BN variance: the next losses stay finite
        out = step(self, x, y, stop)
        if self.it == 5:
            with torch.no_grad():
                self.raw.bn1.running_var.fill_(float("inf"))
        return out

    monkeypatch.setattr(loop.Trainer, "step", poisoned)
    with pytest.raises(UserError, match="weights became non-finite by iteration 6.*last good checkpoint: iteration 3"):
        train(_tiny(max_iters=8, checkpoint_every=3), tmp_path)
    assert checkpoint.all_finite(checkpoint.load(tmp_path / checkpoint.NAME)["model"])


def test_a_data_folder_spelled_another_way_is_the_same_run(tmp_path, monkeypatch):
    """A run started with its data as an absolute path resumes (or returns its summary) when the command names
    the same folder relative to the working directory, and is refused for another folder."""
    from resnet.errors import UserError
    from resnet.train import train
    from resnet.train.config import changed_settings
    from test_data_folder import make_folder

    data = make_folder(tmp_path / "imgs", {"train": {"a": 8, "b": 8}}, size=(8, 8))
    other = make_folder(tmp_path / "other", {"train": {"a": 8, "b": 8}}, size=(8, 8))
    out = tmp_path / "run"
    first = train(_tiny(data=str(data), in_chans=3, val_size=4, batch_size=8, ref_batch_size=8), out)
    monkeypatch.chdir(tmp_path)
    assert train(_tiny(data="imgs/", in_chans=3, val_size=4, batch_size=8, ref_batch_size=8), out) == first
    with pytest.raises(UserError, match=r"different settings \(data\)"):
        train(_tiny(data="other", in_chans=3, val_size=4, batch_size=8, ref_batch_size=8), out)
    assert changed_settings({"data": "cifar10", "lr": 0.1}, {"data": str(other), "lr": 0.1}) == ["data"]
    assert changed_settings({"data": "digits", "threads": 1}, {"data": "digits", "threads": 2}) == []


def test_a_data_folder_whose_files_changed_is_refused_on_resume_and_by_evals_val_carve(tmp_path):
    """Images added to a train-only folder move the seeded validation carve. Resuming used to continue on the
    new split (images the run had validated on now trained on), and `resnet eval RUN --split val` scored
    images the run had trained on; both went on without a word. Both refuse now; an unchanged folder works."""
    import shutil

    from resnet.errors import UserError
    from resnet.evaluate import evaluate
    from resnet.loading import load_model
    from resnet.train import train
    from test_data_folder import make_folder

    data = make_folder(tmp_path / "imgs", {"train": {"a": 8, "b": 8}}, size=(8, 8))
    out, cache = tmp_path / "run", str(tmp_path / "cache")
    cfg = _tiny(data=str(data), in_chans=3, val_size=4, batch_size=8, ref_batch_size=8, cache_dir=cache)
    summary = train(cfg, out)
    recorded = json.loads((out / "model.json").read_text())["val_split"]
    assert recorded["images"] == 16 and len(recorded["digest"]) == 16
    assert evaluate(*load_model(out), str(data), split="val", cache_dir=cache, backend="torch")["n"] == 4
    (out / "summary.json").unlink()  # so the run is taken up again from its last checkpoint
    shutil.copy(data / "train" / "a" / "000.png", data / "train" / "a" / "100.png")
    with pytest.raises(UserError, match=r"images of '.*imgs' changed since '.*run' was checkpointed \(train: 12 "
                                        r"images then, 13 now; val: 4 images then, 4 now\)"):
        train(cfg, out)
    with pytest.raises(UserError, match=r"changed since the model's run carved its validation split from them "
                                        r"\(16 images then, 17 now\)"):
        evaluate(*load_model(out), str(data), split="val", cache_dir=cache, backend="torch")
    # An explicit carve is the user's choice, not the run's: it is scored as asked.
    res = evaluate(*load_model(out), str(data), split="val", val_size=4, data_seed=0, cache_dir=cache,
                   backend="torch")
    assert res["n"] == 4
    (data / "train" / "a" / "100.png").unlink()
    assert train(cfg, out)["iterations"] == summary["iterations"]


def test_a_folder_of_one_class_is_refused_before_training(tmp_path):
    """It trained a 1-way classifier (loss 0 from the first step) and reported 0.00% validation error."""
    from resnet.errors import UserError
    from resnet.train import train
    from test_data_folder import make_folder

    data = make_folder(tmp_path / "imgs", {"train": {"only": 10}}, size=(8, 8))
    with pytest.raises(UserError, match=r"has 1 class \(only\); a classifier needs at least 2"):
        train(_tiny(data=str(data), in_chans=3, val_size=2, batch_size=4, ref_batch_size=4,
                    cache_dir=str(tmp_path / "cache")), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_closed_message_pipe_does_not_end_the_run(tmp_path):
    """`resnet train ... 2>&1 | head -2` stopped the run at its next message with exit status 0, no
    checkpoint of the steps since the last one, and nothing said."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "resnet", "train", "--recipe", "cifar10-resnet20", "--out",
                             str(out), *tiny_overrides(max_iters=12, log_every=1)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    proc.stderr.close()  # the reader is gone before the first message
    assert proc.wait(timeout=120) == 0
    assert json.loads((out / "summary.json").read_text())["iterations"] == 12


def test_a_users_model_json_or_curves_are_not_overwritten(tmp_path):
    """--out naming a folder of the user's own files that a run would write (model.json, curves.png) is refused."""
    from resnet.errors import UserError
    from resnet.train import train

    for name in ("model.json", "curves.png"):
        out = tmp_path / name.split(".")[0]
        out.mkdir()
        (out / name).write_text("the user's own")
        with pytest.raises(UserError, match=rf"holds {name} but no config.yaml"):
            train(_tiny(), out)
        assert (out / name).read_text() == "the user's own"


def test_a_damaged_summary_or_metrics_log_never_blocks_the_resumption(tmp_path):
    """A summary.json that is not JSON gave a traceback; bytes that are not UTF-8, or lines that are not the
    log's records, in metrics.jsonl stopped the resumption of a run whose checkpoint was whole."""
    from resnet.errors import UserError
    from resnet.train import train

    out = tmp_path / "run"
    first = train(_tiny(), out)
    (out / "summary.json").write_text('{"status": "finis')
    with pytest.raises(UserError, match=r"summary.json' is damaged.*delete it and run the same command again"):
        train(_tiny(), out)
    (out / "summary.json").unlink()
    good = (out / "metrics.jsonl").read_text().splitlines()
    with open(out / "metrics.jsonl", "ab") as f:
        f.write(b'garbage{\n\x00\xff\n[1, 2]\n{"iter": 1, "split": "train"}\n')
    again = train(_tiny(), out)
    assert again["iterations"] == first["iterations"] and (out / "curves.png").exists()
    kept = (out / "metrics.jsonl").read_text().splitlines()
    assert kept[:-1] == [line for line in good if '"test"' not in line] and '"test"' in kept[-1]
