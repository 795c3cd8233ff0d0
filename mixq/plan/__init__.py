"""Plans as data: ordered rules from module-name patterns to layer specs."""

from mixq.plan.layer_spec import ALGORITHMS, LayerSpec, Options, PlanError
from mixq.plan.plan import PLAN_VERSION, Plan, Rule

__all__ = ["ALGORITHMS", "PLAN_VERSION", "LayerSpec", "Options", "Plan", "PlanError", "Rule"]
