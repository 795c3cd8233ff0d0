"""The sequential runner and run folders on a tiny random Llama (hidden 64, 2 layers, 2 KV heads, tied).

The norms get random gains so that folding AWQ / SmoothQuant scales into them is not trivial.
Function-preserving checks use the ``fp32`` element format (quantizing to it moves a value by at
most an ulp), so every fold, rotation and statistics transform must be exact up to fp32 rounding.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from mixq.algorithms.runner import quantize_model
from mixq.model.capture import record_inputs
from mixq.model.load import ModelLoadError
from mixq.model.plan_match import count_bits, resolve
from mixq.model.qmodules import QuantLinear, quantizers
from mixq.model.run_folder import OutputExistsError, load_quantized, save_quantized
from mixq.plan import LayerSpec, Options, Plan, PlanError, Rule
from mixq.quant import QuantSpec, fake_quantize

Q = QuantSpec.parse
CALIB = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(0))
TEST = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


def tiny_llama(bias: bool = False) -> nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=128, tie_word_embeddings=True,
                      attention_bias=bias, mlp_bias=bias)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape) + 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape) * 0.1)
    return model


@pytest.fixture(scope="module")
def base() -> nn.Module:
    return tiny_llama()


def logits(model: nn.Module, ids: torch.Tensor = TEST) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def run(base: nn.Module, plan: Plan | LayerSpec, calib: torch.Tensor | None = CALIB, **kw):
    m = copy.deepcopy(base)
    plan = Plan.uniform(plan) if isinstance(plan, LayerSpec) else plan
    report = quantize_model(m, plan, calib, batch_size=4, **kw)
    return m, report


def linears(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n.replace(".inner", ""): m.weight.detach() for n, m in model.named_modules()
            if isinstance(m, nn.Linear)}


# --- keep, RTN, GPTQ ----------------------------------------------------------------------------

def test_keep_all_is_bit_identical(base):
    ref = logits(base)
    for plan in (Plan(()), Plan((Rule("*", LayerSpec.keep()),))):
        m, report = run(base, plan)
        assert torch.equal(logits(m), ref)
        assert report.layers == [] and report.bits["quantized_params"] == 0
        assert not any(isinstance(x, QuantLinear) for x in m.modules())


def test_rtn_equals_fake_quantize_of_each_weight(base):
    spec = Q("int4:g32")
    m, report = run(base, LayerSpec(weights=spec), calib=None)  # RTN needs no data
    before, after = linears(base), linears(m)
    assert len(after) == 15
    for name, W in after.items():
        if name == "lm_head":
            assert torch.equal(W, before[name])  # kept by Plan.uniform
        else:
            assert torch.equal(W, fake_quantize(before[name], spec)), name
            assert not torch.equal(W, before[name])
    assert [r.name for r in report.layers] == [n for n in after if n != "lm_head"]
    assert all(r.loss is None and r.algorithm == "rtn" and r.bits_per_weight == 5.0 for r in report.layers)
    assert report.layers[0].error == pytest.approx(float(((after[report.layers[0].name]
                                                           - before[report.layers[0].name]) ** 2).sum()))
    assert report.bits == count_bits(resolve(Plan.uniform(LayerSpec(weights=spec)), base))
    assert report.calibration == {"samples": 0, "shape": None}
    assert not torch.equal(logits(m), logits(base))
    json.dumps(report.to_json())


def test_gptq_beats_rtn_per_layer(base):
    m, report = run(base, LayerSpec(weights=Q("int4:g32"), algorithm="gptq"))
    assert len(report.layers) == 14
    strict = 0
    for r in report.layers:
        assert r.algorithm == "gptq" and r.loss is not None and r.rtn_loss is not None
        assert r.loss <= r.rtn_loss * (1 + 1e-6), r
        strict += r.loss < 0.95 * r.rtn_loss
    assert strict >= 12
    assert report.calibration == {"samples": 8, "shape": [8, 16]}
    rtn_model, _ = run(base, LayerSpec(weights=Q("int4:g32")))
    ref = logits(base)
    err = [(logits(x) - ref).pow(2).mean().item() for x in (m, rtn_model)]
    assert err[0] < err[1]


def test_needs_data_without_calibration(base):
    for spec in (LayerSpec(weights=Q("int4:g32"), algorithm="gptq"),
                 LayerSpec(weights=Q("int4:g32"), algorithm="awq"),
                 LayerSpec(weights=Q("int8:channel"), inputs=Q("int8"), static_inputs=True),
                 LayerSpec(weights=Q("int8:channel"), options=Options(smooth_alpha=0.5)),
                 LayerSpec(weights=Q("int4:g32"), options=Options(salient=0.1))):
        m = copy.deepcopy(base)
        with pytest.raises(PlanError, match="need calibration data"):
            quantize_model(m, Plan.uniform(spec), None)
        assert torch.equal(logits(m), logits(base))  # raised before touching the model


def test_progress_reports_blocks(base):
    seen = []
    run(base, LayerSpec(weights=Q("int8:channel")), progress=lambda *a: seen.append(a))
    assert ("blocks", 0, 2) in seen and ("blocks", 2, 2) in seen


# --- function-preserving transforms (fp32 "quantization") -----------------------------------------

def test_awq_folding_keeps_the_function(base):
    ref = logits(base)
    for clip in (False, True):
        options = Options(awq_clip=clip, awq_grid=8)
        m, report = run(base, LayerSpec(weights=Q("fp32"), algorithm="awq", options=options))
        norm0 = m.model.layers[0].input_layernorm.weight
        assert not torch.allclose(norm0, base.model.layers[0].input_layernorm.weight)  # scales were folded
        notes = {r.name: r.notes for r in report.layers}
        assert any("awq alpha" in n for n in notes["model.layers.0.self_attn.q_proj"])
        assert any("grouped-query" in n for n in notes["model.layers.0.self_attn.o_proj"])
        assert torch.allclose(logits(m), ref, atol=1e-4), (logits(m) - ref).abs().max()


def test_smoothquant_folding_keeps_the_function(base):
    ref = logits(base)
    spec = LayerSpec(weights=Q("fp32:channel"), inputs=Q("fp32:token"), options=Options(smooth_alpha=0.5))
    m, report = run(base, spec)
    assert not torch.allclose(m.model.layers[1].post_attention_layernorm.weight,
                              base.model.layers[1].post_attention_layernorm.weight)
    assert not torch.allclose(m.model.layers[1].mlp.up_proj.inner.weight,
                              base.model.layers[1].mlp.up_proj.weight)
    assert all(any("smoothquant" in n for n in r.notes) for r in report.layers if "o_proj" not in r.name)
    assert torch.allclose(logits(m), ref, atol=1e-4), (logits(m) - ref).abs().max()


def test_smoothquant_helps_w8a8(base):
    ref = logits(base)
    rtn, _ = run(base, LayerSpec(weights=Q("int8:channel"), inputs=Q("int4:token")))
    sq, _ = run(base, LayerSpec(weights=Q("int8:channel"), inputs=Q("int4:token"),
                                options=Options(smooth_alpha=0.5)))
    assert (logits(sq) - ref).pow(2).mean() < (logits(rtn) - ref).pow(2).mean()


def test_online_hadamard_alone_keeps_the_function(base):
    ref = logits(base)
    plan = Plan((Rule("*.down_proj", LayerSpec(weights=Q("fp32"),
                                               options=Options(hadamard=128, hadamard_seed=0))),
                 Rule("*_proj", LayerSpec(weights=Q("fp32"), options=Options(hadamard=16)))))
    m, _ = run(base, plan, calib=None)
    assert m.model.layers[0].mlp.down_proj.hadamard == 128
    assert torch.allclose(logits(m), ref, atol=1e-4)


def test_offline_rotation_with_keep_all(base):
    ref = logits(base)
    m, report = run(base, Plan(()), rotate="hadamard", rotate_seed=0)
    assert report.rotation is not None and report.rotation["hidden"] == 64
    assert torch.allclose(logits(m), ref, atol=1e-4)
    assert not torch.allclose(m.model.layers[0].self_attn.q_proj.weight,
                              base.model.layers[0].self_attn.q_proj.weight)


def test_gptq_with_online_hadamard(base):
    m, report = run(base, LayerSpec(weights=Q("int4:g32"), algorithm="gptq", options=Options(hadamard=-1)))
    assert all(r.loss <= r.rtn_loss * (1 + 1e-6) for r in report.layers)
    assert m.model.layers[0].self_attn.q_proj.hadamard == 32
    assert torch.isfinite(logits(m)).all()


# --- activation, KV, static ranges ---------------------------------------------------------------

def _outputs(model: nn.Module, name: str, ids: torch.Tensor) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(name).register_forward_hook(lambda mod, a, out: seen.append(out.detach()))
    try:
        logits(model, ids)
    finally:
        handle.remove()
    return seen


def test_kv_outputs_lie_on_the_grid(base):
    kv = Q("int8:g16")  # one scale per head (16) and token
    m, report = run(base, LayerSpec(kv=kv), calib=None)
    assert report.layers == []
    for i in range(2):
        for proj in ("k_proj", "v_proj", "q_proj"):
            name = f"model.layers.{i}.self_attn.{proj}"
            y = _outputs(m, name, TEST)[0]
            if proj == "q_proj":
                assert not isinstance(m.get_submodule(name), QuantLinear)
                continue
            raw = _outputs(m, f"{name}.inner", TEST)[0]
            assert torch.equal(y, fake_quantize(raw, kv))
            assert torch.equal(fake_quantize(y, kv), y) and not torch.equal(y, raw)
    assert not torch.equal(logits(m), logits(base))


def _inputs_of(model: nn.Module, name: str, ids: torch.Tensor) -> torch.Tensor:
    got: list[torch.Tensor] = []
    def keep(_name: str, x: torch.Tensor) -> None:
        got.append(x.reshape(-1, x.shape[-1]))

    with record_inputs({name: model.get_submodule(name)}, keep):
        for q in quantizers(model):
            q.enabled = False
        try:
            with torch.no_grad():
                model(input_ids=ids)
        finally:
            for q in quantizers(model):
                q.enabled = True
    return torch.cat(got)


@pytest.mark.parametrize("smooth", [None, 0.5])
def test_static_input_ranges(base, smooth):
    spec = LayerSpec(weights=Q("int8:channel"), inputs=Q("int8"), static_inputs=True,
                     options=Options(smooth_alpha=smooth))
    m, _ = run(base, spec)
    qs = quantizers(m)
    assert len(qs) == 14 and all(q.enabled and q.static for q in qs)
    assert all(torch.isfinite(q.lo).all() and torch.isfinite(q.hi).all() and (q.lo <= q.hi).all() for q in qs)
    # block 0's q_proj reads norm(embeddings) (divided by the smoothing scales): its observed ranges are
    # those of its actual inputs on the calibration data
    X = _inputs_of(m, "model.layers.0.self_attn.q_proj.inner", CALIB)
    q = m.model.layers[0].self_attn.q_proj.inputs
    assert torch.allclose(q.lo, X.amin(0), rtol=1e-5, atol=1e-6)
    assert torch.allclose(q.hi, X.amax(0), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(logits(m)).all()


# --- bias correction, salient rows, tied head -------------------------------------------------------

def test_bias_correction_oracle():
    model = tiny_llama(bias=True)
    spec = Q("int4:g32")
    name = "model.layers.0.self_attn.q_proj"
    W0 = model.get_submodule(name).weight.detach().clone()
    b0 = model.get_submodule(name).bias.detach().clone()
    X = _inputs_of(model, name, CALIB).double()
    m, _ = run(model, LayerSpec(weights=spec, options=Options(bias_correction=True)))
    Wq = m.get_submodule(name).weight.detach()
    assert torch.equal(Wq, fake_quantize(W0, spec))
    expected = b0.double() + (W0.double() - Wq.double()) @ X.mean(0)
    assert torch.allclose(m.get_submodule(name).bias.double(), expected, atol=1e-5)
    assert not torch.allclose(m.get_submodule(name).bias, b0, atol=1e-4)


def test_bias_correction_without_bias_is_noted(base):
    _, report = run(base, LayerSpec(weights=Q("int4:g32"), options=Options(bias_correction=True)))
    assert all(any("no bias" in n for n in r.notes) for r in report.layers)


def test_salient_rows_kept_in_16_bits(base):
    spec = Q("int4:g32")
    m, report = run(base, LayerSpec(weights=spec, options=Options(salient=0.1)))
    before = linears(base)
    for name, Wq in linears(m).items():
        if name == "lm_head":
            continue
        W0 = before[name]
        k = math.ceil(0.1 * W0.shape[0])
        kept = (Wq == W0.half().float()).all(1)
        rtn_rows = (Wq == fake_quantize(W0, spec)).all(1)
        assert int(kept.sum()) >= k and bool((kept | rtn_rows).all()), name
    r = report.layers[0]
    assert r.loss < r.rtn_loss


def test_quantized_tied_head_is_untied(base):
    emb = base.model.embed_tokens.weight.detach().clone()
    spec = Q("int4:g32")
    m, report = run(base, Plan.uniform(LayerSpec(weights=spec), keep=()), calib=None)
    assert m.lm_head.weight is not m.model.embed_tokens.weight
    assert torch.equal(m.model.embed_tokens.weight, emb)
    assert torch.equal(m.lm_head.weight, fake_quantize(emb, spec))
    assert m.config.tie_word_embeddings is False
    assert any("untied" in n for n in report.layers[-1].notes) and report.layers[-1].name == "lm_head"
    assert base.lm_head.weight is base.model.embed_tokens.weight  # the copy's source is untouched
    # with data, the head is calibrated in the extra pass outside the blocks
    m2, report2 = run(base, Plan.uniform(LayerSpec(weights=spec, algorithm="gptq"), keep=()))
    head = report2.layers[-1]
    assert head.name == "lm_head" and head.algorithm == "gptq" and head.loss <= head.rtn_loss
    assert torch.equal(m2.model.embed_tokens.weight, emb)


# --- other architectures and convolutions ------------------------------------------------------------

def other_model(family: str) -> nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    small = dict(num_attention_heads=4, num_hidden_layers=2, vocab_size=128)
    if family == "opt":
        cfg = tf.OPTConfig(hidden_size=64, ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=64,
                           **small)
    elif family == "gpt2":  # Conv1D layers, fused c_attn
        cfg = tf.GPT2Config(n_embd=64, n_head=4, n_layer=2, vocab_size=128, n_positions=64, bos_token_id=0,
                            eos_token_id=0)
    elif family == "bert":
        return tf.AutoModel.from_config(tf.BertConfig(hidden_size=64, intermediate_size=128, **small)).eval()
    elif family == "gemma":  # norm weights act as (1 + w)
        cfg = tf.GemmaConfig(hidden_size=64, intermediate_size=128, num_key_value_heads=4, head_dim=16,
                             **small)
    else:
        cfg = tf.Qwen2Config(hidden_size=64, intermediate_size=128, num_key_value_heads=2, **small)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.add_(torch.rand(p.shape) * 0.5)
    return model


def _out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=TEST)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("family", ["opt", "gpt2", "bert", "gemma", "qwen2"])
def test_other_architectures(family):
    model = other_model(family)
    ref = _out(model)
    m, report = run(model, LayerSpec(weights=Q("int4:g16"), algorithm="gptq"))
    assert report.layers and all(r.loss <= r.rtn_loss * (1 + 1e-6) for r in report.layers)
    for spec in (LayerSpec(weights=Q("fp32"), inputs=Q("fp32:token"), options=Options(smooth_alpha=0.5)),
                 LayerSpec(weights=Q("fp32"), algorithm="awq", options=Options(awq_grid=4, awq_clip=False))):
        m, report = run(model, spec)
        assert any("alpha" in n for r in report.layers for n in r.notes)
        assert torch.allclose(_out(m), ref, atol=1e-4), (family, spec.algorithm, (_out(m) - ref).abs().max())


def test_convolutions_use_unfolded_inputs():
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3, groups=4), nn.Flatten(),
                        nn.Linear(16 * 4 * 4, 10)).eval()
    images = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    m = copy.deepcopy(cnn)
    report = quantize_model(m, Plan.uniform(LayerSpec(weights=Q("int4:channel"), algorithm="gptq"), keep=()),
                            images, batch_size=4)
    rows = {r.name: r for r in report.layers}
    assert rows["0"].algorithm == "gptq" and rows["0"].loss <= rows["0"].rtn_loss
    assert rows["4"].algorithm == "gptq" and rows["4"].loss < rows["4"].rtn_loss
    assert rows["2"].algorithm == "rtn" and rows["2"].loss is None and "grouped conv" in rows["2"].notes[0]
    assert torch.equal(m[2].weight, fake_quantize(cnn[2].weight.reshape(16, -1), Q("int4:channel")).reshape(
        cnn[2].weight.shape))


# --- run folders: save, reload, refuse to overwrite -----------------------------------------------

FOLDER_CASES = {
    "weight-only": (Plan.uniform(LayerSpec(weights=Q("int4:g32"), algorithm="gptq")), None),
    "w8a8-static": (Plan.uniform(LayerSpec(weights=Q("int8:channel"), inputs=Q("int8"), static_inputs=True,
                                           options=Options(smooth_alpha=0.5))), None),
    "hadamard-kv": (Plan.uniform(LayerSpec(weights=Q("mxfp4"), inputs=Q("int8:token"), kv=Q("int8:g16"),
                                           options=Options(hadamard=32, hadamard_seed=1))), None),
    "rotated-head": (Plan.uniform(LayerSpec(weights=Q("int4:g32")), keep=()), "hadamard"),
}


def save_run(base: nn.Module, case: str, out, **kw):
    plan, rotate = FOLDER_CASES[case]
    m, report = run(base, plan, rotate=rotate, rotate_seed=0 if rotate else None)
    meta = {"case": case, "report": report.to_json()}
    path = save_quantized(m, None, resolve(plan, base), out, meta=meta, **kw)
    return m, path


@pytest.mark.parametrize("case", list(FOLDER_CASES))
def test_run_folder_reloads_exactly(base, tmp_path, case):
    m, path = save_run(base, case, tmp_path / "out")
    ref = logits(m)
    assert torch.equal(logits(m), ref)  # the in-memory model is re-wrapped after saving
    loaded, meta = load_quantized(path)
    assert meta["case"] == case and "mixq_version" in meta and meta["source"] is None
    assert torch.equal(logits(loaded), ref), (logits(loaded) - ref).abs().max()
    assert not torch.equal(ref, logits(base))
    assert sorted(n for n, x in loaded.named_modules() if isinstance(x, QuantLinear)) == \
        sorted(n for n, x in m.named_modules() if isinstance(x, QuantLinear))
    assert (path / "quantizers.safetensors").is_file() == (case == "w8a8-static")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left
    if case == "rotated-head":
        assert loaded.config.tie_word_embeddings is False
        assert loaded.lm_head.weight.data_ptr() != loaded.model.embed_tokens.weight.data_ptr()
        assert torch.equal(loaded.lm_head.weight, m.lm_head.weight)


def test_run_folder_untied_head_without_rotation(base, tmp_path):
    plan = Plan.uniform(LayerSpec(weights=Q("int4:g32")), keep=())
    m, _ = run(base, plan, calib=None)
    loaded, _ = load_quantized(save_quantized(m, None, resolve(plan, base), tmp_path / "o"))
    assert loaded.config.tie_word_embeddings is False
    assert torch.equal(loaded.model.embed_tokens.weight, base.model.embed_tokens.weight)
    assert torch.equal(loaded.lm_head.weight, fake_quantize(base.model.embed_tokens.weight, Q("int4:g32")))
    assert torch.equal(logits(loaded), logits(m))


def test_run_folder_overwrite_rules(base, tmp_path):
    out = tmp_path / "out"
    save_run(base, "w8a8-static", out)
    with pytest.raises(OutputExistsError, match="exists"):
        save_run(base, "weight-only", out)
    assert load_quantized(out)[1]["case"] == "w8a8-static"
    m, _ = save_run(base, "weight-only", out, overwrite=True)
    loaded, meta = load_quantized(out)
    assert meta["case"] == "weight-only" and not (out / "quantizers.safetensors").exists()
    assert torch.equal(logits(loaded), logits(m))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_run_folder_never_over_its_source(base, tmp_path):
    src = tmp_path / "src"
    base.save_pretrained(src)
    before = sorted(p.name for p in src.iterdir())
    plan = Plan.uniform(LayerSpec(weights=Q("int8:channel")))
    m, _ = run(base, plan, calib=None)
    with pytest.raises(OutputExistsError, match="source"):
        save_quantized(m, None, resolve(plan, base), tmp_path / "." / "src", source=src, overwrite=True)
    assert sorted(p.name for p in src.iterdir()) == before
    with pytest.raises(ModelLoadError, match="mixq.json"):
        load_quantized(src)
