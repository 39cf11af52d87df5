"""The planner behind ``hai-llm-dryrun``: a whole parallel layout's memory and traffic per rank
role, in one process, without allocating weights.

``units`` (the model counted on the meta device), ``activations`` (bytes stashed per token),
``traffic`` (bytes sent per step by group and link), ``plan`` (``plan_layout`` /
``plan_config``: the accounting over ``hai_llm.layout.build_layout``), ``report`` (tables and
the process groups of a rank), ``collectives`` (the layout's collective program, checked for
hangs with ``hai_llm.parallel.collective_trace``).

The time-and-cost planner behind ``hai-llm-cost`` (docs/cost.md): ``flops`` (FLOPs per token),
``hardware`` (profiles in configs/hardware/), ``step_sim`` (one step on paper, driven by the
schedule's action lists and the executor's piece order), ``balance`` (a rank-balanced stage
split), ``cost`` (report, what-if table, timeline picture).
"""
from .plan import Plan, RankPlan, Role, StagePlan, default_n_micro, plan_config, plan_from_layout, plan_layout
from .report import format_plan, print_plan

__all__ = ["Plan", "RankPlan", "Role", "StagePlan", "default_n_micro", "plan_config", "plan_from_layout",
           "plan_layout", "format_plan", "print_plan"]
