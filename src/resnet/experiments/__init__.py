"""The paper's experiments, re-run with one command each: degradation, shortcuts, responses, table6."""

from .plan import EXPERIMENTS, RunSpec, Settings, plan_runs
from .responses import response_stds, three_by_three_bns
from .runner import reproduce

__all__ = ["EXPERIMENTS", "RunSpec", "Settings", "plan_runs", "reproduce", "response_stds", "three_by_three_bns"]
