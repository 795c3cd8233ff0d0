"""The per-token model Fisher: its matrix identity, its expectation, and its place in a profile."""

import numpy as np
import torch

from conftest import lm_batches, make_llama
from mixq.plan import parse_candidates
from mixq.sensitivity.model_fisher import model_fisher
from mixq.sensitivity.profile import profile


def test_lm_head_fisher_matches_its_closed_form():
    """For the LM head, positions are independent and E_y[δ_ti²] = p_ti (1 - p_ti) for a sampled label y,
    so F_ij = mean_t h_tj² p_ti (1 - p_ti) exactly in expectation; Monte Carlo over 1024 positions."""
    model = make_llama()
    batches = lm_batches(n=16, b=4, t=16, seed=3)
    head = model.lm_head
    F = model_fisher(model, {"lm_head": head}, batches, seed=0)["lm_head"].double()  # [V, d]
    hs, ps = [], []
    with torch.no_grad():
        for b in batches:
            out = model(**b, output_hidden_states=True)
            hs.append(out.hidden_states[-1].reshape(-1, head.in_features).double())  # after the final norm
            ps.append(out.logits.reshape(-1, head.out_features).double().softmax(-1))
    h, p = torch.cat(hs), torch.cat(ps)  # [N, d], [N, V]
    exact = (p * (1 - p)).T @ h**2 / h.shape[0]  # [V, d]
    dW = torch.randn(exact.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mc, ref = float((F * dW**2).sum()), float((exact * dW**2).sum())
    assert abs(mc / ref - 1) < 0.1, (mc, ref)


def test_fisher_is_the_sum_of_squared_per_position_gradients():
    """Oracle: per-position outer products δ_t x_tᵀ, squared and summed in a loop, with the same sampled
    labels; their plain sum must equal autograd's weight gradient (δ and x are the right tensors)."""
    model = make_llama()
    batches = lm_batches(n=1, b=2, t=8, seed=5)
    layer = model.model.layers[1].mlp.down_proj
    F = model_fisher(model, {"down": layer}, batches, seed=7)["down"].double()
    g = torch.Generator().manual_seed(7)
    seen = {}
    handle = layer.register_forward_hook(lambda m, a, o: seen.update(x=a[0].detach(), y=o))
    for p in model.parameters():
        p.requires_grad_(False)
    layer.weight.requires_grad_(True)
    try:
        logits = model(**batches[0]).logits.float()
        labels = torch.multinomial(logits.detach().softmax(-1).reshape(-1, logits.shape[-1]), 1, generator=g)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 reduction="sum")
        d, gW = torch.autograd.grad(loss, [seen["y"], layer.weight])
    finally:
        handle.remove()
        layer.weight.requires_grad_(False)
    x, d = seen["x"].reshape(-1, layer.in_features).double(), d.reshape(-1, layer.out_features).double()
    outer = [torch.outer(d[t], x[t]) for t in range(x.shape[0])]
    torch.testing.assert_close(sum(outer), gW.double(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(F, sum(o**2 for o in outer) / x.shape[0], rtol=1e-4, atol=1e-10)


def test_profile_scores_fisher_model_like_a_kl():
    model = make_llama()
    cands = parse_candidates("int2:g32,int4:g32,int8:channel,keep")
    table = profile(model, cands, lm_batches(n=2), metrics=("fisher_model", "kl"))
    fm, kl = table.metric("fisher_model"), table.metric("kl")
    assert np.all(fm[:, -1] == 0) and np.all(fm[:, :-1] > 0)
    assert np.all(fm[:, 0] > fm[:, 1]) and np.all(fm[:, 1] > fm[:, 2])  # coarser formats score worse
    ratio = fm[:, 2] / kl[:, 2]  # int8: the quadratic regime, where the Fisher should predict the KL
    assert np.all((ratio > 0.2) & (ratio < 5)), ratio  # measured 0.34 to 1.25
