"""Plans as data: ordered rules from module-name patterns to layer specs."""

from mixq.plan.layer_spec import ALGORITHMS, LayerSpec, Options, PlanError
from mixq.plan.plan import PLAN_VERSION, Plan, Rule
from mixq.plan.candidates import DEFAULT_CANDIDATES, KEEP, KEEP_BITS, Candidate, candidate_named, parse_candidate, parse_candidates

__all__ = ["DEFAULT_CANDIDATES", "KEEP", "KEEP_BITS", "Candidate", "candidate_named", "parse_candidate", "parse_candidates", "ALGORITHMS", "PLAN_VERSION", "LayerSpec", "Options", "Plan", "PlanError", "Rule"]
