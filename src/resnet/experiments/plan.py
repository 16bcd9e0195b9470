"""Which trainings each experiment needs: a table of runs, each a normal, resumable run directory.

Full mode uses the paper's CIFAR-10 recipes unchanged (on `--data` when given). `--quick` keeps the
networks and shortens everything else, stated in `QUICK_NOTES`; without `--data` it trains on the embedded
digits set (the quickstart recipe), so it runs offline anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UserError, did_you_mean

EXPERIMENTS = ("degradation", "shortcuts", "responses", "table6")


@dataclass(frozen=True)
class RunSpec:
    name: str  # run directory name under DIR/runs
    arch: str
    recipe: str
    overrides: tuple[str, ...] = ()
    seed: int = 0
    shortcut: str | None = None
    tags: dict = field(default_factory=dict, hash=False, compare=False)

    def all_overrides(self) -> list[str]:
        extra = [f"seed={self.seed}"]
        if self.shortcut:
            extra.append(f"shortcut={self.shortcut}")
        return [*self.overrides, *extra]


@dataclass(frozen=True)
class Settings:
    quick: bool
    data: str | None
    seeds: int = 1
    depths: tuple[int, ...] | None = None
    max_iters: int | None = None  # quick mode's iteration count (None: the mode's default)
    val_size: int | None = None  # quick mode on --data: images held out (None: QUICK_DATA's)


# Reduced settings of --quick, per data source; stated in every quick report.
QUICK_DIGITS = {"max_iters": 300, "eval_every": 50, "log_every": 10, "ramp_iters": 30,
                "checkpoint_every": 100, "depths": (20, 32, 44, 56)}
QUICK_DATA = {"max_iters": 200, "batch_size": 64, "ref_batch_size": 64, "eval_every": 100, "log_every": 10,
              "checkpoint_every": 100, "val_size": 1000, "depths": (20, 56)}
FULL_DEPTHS = {"degradation": (20, 32, 44, 56), "shortcuts": (32,), "responses": (20, 56, 110),
               "table6": (20, 32, 44, 56, 110)}
# Fig. 7 shows plain-20 and plain-56 beside ResNet-20, 56 and 110: the full responses experiment trains no
# plain-110 (a 64k-iteration training the figure does not use).
FULL_PLAIN_DEPTHS = {"responses": (20, 56)}


def quick_notes(s: Settings) -> list[str]:
    if not s.quick:
        return []
    if s.data is None:
        q = QUICK_DIGITS
        return ["data: the embedded 8x8 digits set (1,293 train / 144 val / 360 test images), not CIFAR-10",
                f"{_iters(s, q)} iterations of batch 64 per network (the paper: 64,000 of batch 128)",
                f"learning rate 0.1 with a {_ramp(s)}-iteration ramp and cosine decay (the paper: "
                f"0.1, divided by 10 at 32k and 48k)",
                "no augmentation (flips and crops change what a digit is on an 8x8 grid)"]
    q = QUICK_DATA
    return [f"data: {s.data}, with {_val_size(s)} images held out for validation",
            f"{_iters(s, q)} iterations of batch {q['batch_size']} per network (the paper: 64,000 of 128); "
            f"lr 0.1 throughout (too few iterations to reach the paper's first step at 32k)"]


def _iters(s: Settings, q: dict) -> int:
    return s.max_iters or q["max_iters"]


def _val_size(s: Settings) -> int:
    return s.val_size or QUICK_DATA["val_size"]


def _ramp(s: Settings) -> int:
    """The quick digits ramp: 30 iterations, at most a tenth of a shorter run (--iters 20 never reached 0.1)."""
    return min(QUICK_DIGITS["ramp_iters"], max(1, _iters(s, QUICK_DIGITS) // 10))


def _depths(experiment: str, s: Settings) -> tuple[int, ...]:
    if s.depths:
        return s.depths
    if not s.quick:
        return FULL_DEPTHS[experiment]
    if experiment == "shortcuts":
        return (20,)
    return (QUICK_DIGITS if s.data is None else QUICK_DATA)["depths"]


def _base(arch: str, s: Settings) -> tuple[str, list[str]]:
    """(recipe, overrides) that train `arch` in this mode."""
    if s.quick and s.data is None:
        q = QUICK_DIGITS
        over = [f"arch={arch}", f"max_iters={_iters(s, q)}", f"ramp_iters={_ramp(s)}"] + [
            f"{k}={q[k]}" for k in ("eval_every", "log_every", "checkpoint_every")]
        recipe = "quickstart"
    else:
        recipe = f"cifar10-{arch}"
        over = [f"data={s.data}"] if s.data else []
        if s.quick:
            q = QUICK_DATA
            it = _iters(s, q)
            over += [f"max_iters={it}", "milestones=[]", "warmup_lr=0.0", f"val_size={_val_size(s)}"] + [
                f"{k}={q[k]}" for k in ("batch_size", "ref_batch_size", "eval_every", "log_every",
                                        "checkpoint_every")]
    if arch.startswith("plain"):
        over.append("shortcut=null")
    return recipe, over


def plan_runs(experiment: str, s: Settings) -> list[RunSpec]:
    """The runs `experiment` needs in this mode, in the order they are trained."""
    if experiment not in EXPERIMENTS:
        raise UserError(f"unknown experiment '{experiment}'{did_you_mean(experiment, EXPERIMENTS)}; "
                        f"choose one of {', '.join(EXPERIMENTS)}.")
    runs = []
    for seed in range(s.seeds):
        for depth in _depths(experiment, s):
            if experiment in ("degradation", "responses"):
                kinds = [("plain", None), ("resnet", None)]
            elif experiment == "shortcuts":
                kinds = [("resnet", sc) for sc in "ABC"]
            else:
                kinds = [("resnet", None)]
            for prefix, shortcut in kinds:
                arch = f"{prefix}{depth}"
                if prefix == "plain" and depth > 110:
                    continue
                if prefix == "plain" and not (s.quick or s.depths) and depth not in FULL_PLAIN_DEPTHS.get(
                        experiment, (depth,)):
                    continue
                recipe, over = _base(arch, s)
                name = arch + (f"-{shortcut}" if shortcut else "") + f"-seed{seed}"
                runs.append(RunSpec(name, arch, recipe, tuple(over), seed, shortcut,
                                    {"depth": depth, "plain": prefix == "plain"}))
    return runs
