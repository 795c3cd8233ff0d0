"""Sensitivity: per layer × candidate degradation scores (data-free, Fisher, Hessian trace, measured KL).

:func:`profile` fills a :class:`SensitivityTable`; :func:`validate` rank-correlates its predicted
metrics with measured KL. The table module is pure data (numpy); search code imports only it.
"""

from mixq.sensitivity.table import LayerInfo, ProfileError, SensitivityTable, model_fingerprint
from mixq.sensitivity.outputs import ProfileInputError
from mixq.sensitivity.measured import OutputCache
from mixq.sensitivity.profile import METRICS, Progress, profile, profile_layers
from mixq.sensitivity.validate import validate

__all__ = ["LayerInfo", "METRICS", "OutputCache", "ProfileError", "ProfileInputError", "Progress", "SensitivityTable",
           "model_fingerprint", "profile", "profile_layers", "validate"]
