"""Shared test configuration: one CPU thread and a modest hypothesis profile.

``MIXQ_HYPOTHESIS_PROFILE=thorough`` runs the property tests with many more examples.
"""

import os

import torch
from hypothesis import HealthCheck, settings

torch.set_num_threads(1)

settings.register_profile("mixq", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("MIXQ_HYPOTHESIS_PROFILE", "mixq"))
