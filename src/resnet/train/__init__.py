"""Training: recipes and strict config, the loop, schedules, checkpoints and torchrun/DDP set-up.

`cfg = load_recipe(name_or_yaml, overrides)`; `summary = train(cfg, out_dir)` runs or resumes a run.
"""

from .config import TrainConfig, list_recipes, load_recipe
from .loop import train

__all__ = ["TrainConfig", "list_recipes", "load_recipe", "train"]
