"""Fisher and Hutchinson statistics against exact oracles."""

import copy

import pytest
import torch
from torch import nn

from conftest import lm_batches
from mixq.model.swap import quantize_input
from mixq.quant import QuantSpec
from mixq.sensitivity.gradients import fisher_stats, hessian_traces, hutchinson_traces
from mixq.sensitivity.outputs import lm_loss


def test_hutchinson_exact_for_diagonal_quadratic() -> None:
    # v ⊙ (D v) = diag(D) for every Rademacher v: the estimate is exact with one sample.
    d1, d2 = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([[0.5, 4.0], [7.0, -1.0]])
    w1, w2 = torch.randn(3, requires_grad=True), torch.randn(2, 2, requires_grad=True)
    loss = 0.5 * (d1 * w1 ** 2).sum() + 0.5 * (d2 * w2 ** 2).sum() + (w1.sum() * 3)
    traces = hutchinson_traces(loss, [w1, w2], 1, torch.Generator().manual_seed(0))
    assert traces == pytest.approx([2.0, 10.5], abs=1e-6)


def test_hutchinson_matches_trace_of_coupled_quadratic() -> None:
    # L = 0.5 w^T A w with A dense (couples the two parameters): E[v_l ⊙ (A v)_l] = tr(A_ll).
    g = torch.Generator().manual_seed(0)
    M = torch.randn(7, 7, generator=g)
    A = M @ M.t() + torch.eye(7)
    w = torch.randn(7, generator=g)
    w1, w2 = w[:3].clone().requires_grad_(True), w[3:].clone().requires_grad_(True)
    x = torch.cat([w1, w2])
    loss = 0.5 * x @ A @ x
    traces = hutchinson_traces(loss, [w1, w2], 3000, torch.Generator().manual_seed(1))
    exact = [float(A[:3, :3].trace()), float(A[3:, 3:].trace())]
    off = float(A.pow(2).sum() - A.diagonal().pow(2).sum()) ** 0.5  # scale of the estimator's noise
    for t, e in zip(traces, exact):
        assert abs(t - e) < 4 * off / 3000 ** 0.5 * 2


def test_hessian_traces_on_mlp_match_exact_hessian() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    batches = [{"x": x, "y": y}]

    def loss_fn(m, batch, index):
        return ((m(batch["x"]) - batch["y"]) ** 2).mean()

    modules = {"0": model[0], "2": model[2]}
    est = hessian_traces(model, modules, batches, loss_fn, samples=4000, seed=0)
    params = dict(model.named_parameters())

    def f(w0, w2):
        out = torch.func.functional_call(model, {**params, "0.weight": w0, "2.weight": w2}, (x,))
        return ((out - y) ** 2).mean()

    H = torch.autograd.functional.hessian(f, (params["0.weight"].detach(), params["2.weight"].detach()))
    full = torch.cat([torch.cat([H[a][b].reshape(H[a][b].shape[0] * H[a][b].shape[1], -1) for b in range(2)], 1)
                      for a in range(2)])  # [20, 20] Hessian over both weights
    for name, sl in (("0", slice(0, 12)), ("2", slice(12, 20))):
        block = full[sl]  # rows of this layer
        exact = float(block[:, sl].trace())
        # variance of v_l^T (H v)_l: each off-diagonal pair inside the layer counts twice, across layers once
        inside = block[:, sl] - torch.diag(block[:, sl].diagonal())
        var = 2 * float(inside.pow(2).sum()) + float(block.pow(2).sum() - block[:, sl].pow(2).sum())
        assert abs(est[name] - exact) < 4 * (var / 4000) ** 0.5
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_fisher_matches_backward_oracle_with_input_terms(llama) -> None:
    batches = lm_batches()
    q, down = "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"
    modules = {n: llama.get_submodule(n) for n in (q, down, "model.layers.1.self_attn.k_proj")}
    spec = QuantSpec.parse("int4:token")

    def loss_fn(m, batch, index):
        return lm_loss(m(**batch, use_cache=False).logits, batch)

    F, xt = fisher_stats(llama, modules, batches, loss_fn, {q: [spec], down: [spec, QuantSpec.parse("int8:token")]})
    assert all(p.grad is None for p in llama.parameters())
    assert all(p.requires_grad for p in llama.parameters())
    # oracle: plain backward on a copy, the layer inputs and outputs kept with retain_grad
    ref = copy.deepcopy(llama)
    F_ref = {n: torch.zeros_like(m.weight) for n, m in modules.items()}
    x_ref = {q: 0.0, down: [0.0, 0.0]}
    for batch in batches:
        ref.zero_grad()
        seen = {}
        hooks = [ref.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: seen.update({n: (a[0], o)}))
                 for n in (q, down)]
        loss = lm_loss(ref(**batch, use_cache=False).logits, batch)
        for n in (q, down):
            seen[n][1].retain_grad()
        loss.backward()
        for h in hooks:
            h.remove()
        for n in modules:
            F_ref[n] += ref.get_submodule(n).weight.grad ** 2
        for n in (q, down):
            x, out = seen[n][0].detach(), seen[n][1]
            gx = out.grad @ ref.get_submodule(n).weight  # gradient through this layer only
            specs = [spec] if n == q else [spec, QuantSpec.parse("int8:token")]
            vals = [0.5 * float((gx.detach().double() ** 2 * (x - quantize_input(x, s)).double() ** 2).sum()) for s in specs]
            if n == q:
                x_ref[q] += vals[0]
            else:
                x_ref[down] = [a + b for a, b in zip(x_ref[down], vals)]
    for n in modules:
        torch.testing.assert_close(F[n], F_ref[n] / 2, rtol=1e-4, atol=1e-12)
    assert xt[q][0] == pytest.approx(x_ref[q] / 2, rel=1e-4)
    assert xt[down] == pytest.approx([v / 2 for v in x_ref[down]], rel=1e-4)
    assert xt[down][0] > xt[down][1] > 0  # 4-bit inputs cost more than 8-bit
