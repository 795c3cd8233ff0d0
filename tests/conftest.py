"""Shared test configuration: one CPU thread and a modest hypothesis profile.

``MIXQ_HYPOTHESIS_PROFILE=thorough`` runs the property tests with many more examples.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

torch.set_num_threads(1)

settings.register_profile("mixq", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("MIXQ_HYPOTHESIS_PROFILE", "mixq"))


@pytest.fixture(scope="session")
def make_llama_folder():
    """``make(root)`` writes a tiny random Llama (hidden 64, 2 layers, vocab 128, tied) to ``root/src``
    and 5000 random token ids to ``root/tokens.pt`` (calibration and test data without a tokenizer)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    def make(root):
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                          num_hidden_layers=2, vocab_size=128, tie_word_embeddings=True)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "src")
        tokens = torch.randint(0, 128, (5000,), generator=torch.Generator().manual_seed(0))
        torch.save(tokens, root / "tokens.pt")
        return root

    return make
