"""LoRA on transformers' mixture-of-experts models (``target_parameters``, ``LoRAExperts``,
``LoRAParameter``) against peft 0.21.2: selection, trainable counts, outputs and gradients after
a save/load in each direction, each experts implementation, merge, and the refusals."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_peft import (
    LoRAConfig,
    inject_adapters,
    load_adapter,
    merge_adapters,
    save_adapter,
    unload,
    unmerge_adapters,
)
from lightning_peft.methods.lora.experts import LoRAExperts
from lightning_peft.peft_format.files import read_config
from tests.helpers.peft_interop import our_grads, their_grads
from tests.helpers.tiny_models import MOE_MODELS, tokens

peft = pytest.importorskip("peft")

IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")


def _logits_and_grads(model, ids, grads_of):
    model.zero_grad(set_to_none=True)
    embeddings = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeddings).logits
    logits.square().mean().backward()
    return logits.detach(), grads_of(model), embeddings.grad


def _assert_same(ours, theirs, ids, rtol=1e-5, atol=1e-5) -> tuple[float, float]:
    """Outputs, adapter gradients (by PEFT key) and the input gradient agree; returns the largest
    output difference and the largest gradient difference relative to each tensor's maximum."""
    y_ours, g_ours, dx_ours = _logits_and_grads(ours, ids, our_grads)
    y_theirs, g_theirs, dx_theirs = _logits_and_grads(theirs, ids, their_grads)
    torch.testing.assert_close(y_ours, y_theirs, rtol=rtol, atol=atol)
    assert g_ours.keys() == g_theirs.keys(), sorted(set(g_ours) ^ set(g_theirs))
    worst = 0.0
    for key, grad in [*g_ours.items(), ("input", dx_ours)]:
        peer = g_theirs.get(key, dx_theirs)
        scale = peer.abs().max().clamp_min(1e-12)
        torch.testing.assert_close(grad, peer, rtol=rtol * 10, atol=atol * float(scale), msg=key)
        worst = max(worst, float((grad - peer).abs().max() / scale))
    return float((y_ours - y_theirs).abs().max()), worst


def _set_implementation(model, implementation: str) -> None:
    model.config._experts_implementation = implementation
    for module in model.modules():
        if hasattr(module, "config") and hasattr(module.config, "_experts_implementation"):
            module.config._experts_implementation = implementation


KWARGS = {"r": 3, "lora_alpha": 5, "target_modules": "all-linear", "init_lora_weights": False}


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_all_linear_selects_what_peft_selects(family):
    """peft rewrites all-linear on these models into the attention linears plus
    target_parameters gate_up_proj (rank 2r), down_proj and gate.weight."""
    base = MOE_MODELS[family]()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**KWARGS))
    ours = copy.deepcopy(base)
    report = inject_adapters(ours, LoRAConfig(**KWARGS))
    peft_trainable = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert report.trainable_params == peft_trainable
    ours_keys = {k: tuple(v.shape) for k, v in _saved(ours).items()}
    theirs_keys = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(theirs).items()}
    assert ours_keys == theirs_keys
    kinds = {m.kind for m in report.modules}
    if family == "gpt_oss":  # not a model peft rewrites: attention only, in both packages
        assert kinds == {"LoRA"}
        return
    assert kinds == {"LoRA", "LoRA (experts)", "LoRA (parameter)"}
    experts = next(m for m in report.modules if m.kind == "LoRA (experts)")
    assert "4 experts" in experts.shape and "r=6" in experts.shape  # gate_up_proj at 2r


def _saved(model):
    from lightning_peft.model.helpers import adapter_state_dict
    from lightning_peft.peft_format.files import peft_keys

    live = adapter_state_dict(model)
    names = peft_keys(model, live)
    return {names[k]: v for k, v in live.items()}


ONE_EXPERT = {"num_experts": 1, "num_experts_per_tok": 1}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss", "qwen3_moe E=1"])
def test_matches_peft_both_ways(family, implementation, tmp_path):
    """peft's adapter loads here and ours in peft: equal logits, adapter and input gradients,
    for each experts implementation transformers offers (and one expert, top-1)."""
    kwargs = dict(KWARGS)
    if family == "gpt_oss":  # peft leaves gpt-oss alone: name the parameters
        kwargs["target_parameters"] = ["gate_up_proj", "down_proj", "router.weight"]
    base = MOE_MODELS[family.split()[0]](**(ONE_EXPERT if "E=1" in family else {}))
    _set_implementation(base, implementation)
    assert base.model.layers[0].mlp.experts.config._experts_implementation == implementation
    ids = tokens(batch=3, length=5)

    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(copy.deepcopy(base), tmp_path / "peft")
    out, grad = _assert_same(ours, theirs, ids)
    print(f"\n{family} {implementation} peft->ours: out {out:.1e}, grad {grad:.1e}")

    ours = copy.deepcopy(base)
    inject_adapters(ours, LoRAConfig(**kwargs))
    save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(
        copy.deepcopy(base), tmp_path / "ours", is_trainable=True
    )
    out, grad = _assert_same(ours, theirs, ids)
    print(f"{family} {implementation} ours->peft: out {out:.1e}, grad {grad:.1e}")


def _selection(family, **kwargs):
    """(our PEFT keys and shapes, our trainable count), and peft's, for ``kwargs``."""
    base = MOE_MODELS[family]()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, **kwargs))
    ours = copy.deepcopy(base)
    report = inject_adapters(ours, LoRAConfig(r=2, **kwargs))
    peft_keys_ = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(theirs).items()}
    peft_count = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    ours_keys = {k: tuple(v.shape) for k, v in _saved(ours).items()}
    return (ours_keys, report.trainable_params), (peft_keys_, peft_count)


@pytest.mark.parametrize(
    ("family", "targets"),
    [
        ("mixtral", ["w1", "w2", "w3"]),
        ("mixtral", ["q_proj", "gate", "w2"]),
        ("qwen3_moe", ["gate_proj", "up_proj", "down_proj", "v_proj"]),
        ("qwen3_moe", r".*layers\.1\.(self_attn\.k_proj|mlp\.experts\.down_proj)"),
        ("qwen3_moe", r".*\.mlp\.gate"),
    ],
)
def test_v4_names_and_regexes_select_what_peft_selects(family, targets):
    """Mixtral's w1/w2/w3 and Qwen's gate_proj/up_proj/down_proj become the fused parameters;
    a regex is resolved to leaf names first, as peft does (so layer 1's regex adapts layer 0
    too, in both packages)."""
    ours, theirs = _selection(family, target_modules=targets)
    assert ours == theirs


@pytest.mark.parametrize(("family", "half"), [("mixtral", ["w1"]), ("qwen3_moe", ["up_proj"])])
def test_one_half_of_a_fused_weight_is_refused_as_in_peft(family, half):
    base = MOE_MODELS[family]()
    with pytest.raises(ValueError, match="fused"):
        peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=half))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match="fused into one gate_up_proj"):
        inject_adapters(base, LoRAConfig(target_modules=half))
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_target_parameters_alone_and_the_saved_config(tmp_path):
    """target_parameters without target_modules; the file names the exact parameters, and
    rank_pattern applies by parameter name."""
    base = MOE_MODELS["qwen3_moe"]()
    kwargs = {"target_parameters": ["down_proj"], "rank_pattern": {r"layers\.1\..*": 5}}
    ours, theirs = _selection("qwen3_moe", **kwargs)
    assert ours == theirs
    inject_adapters(base, LoRAConfig(r=2, **kwargs))
    save_adapter(base, tmp_path)
    config = read_config(tmp_path)
    assert config.target_modules == []
    assert config.target_parameters == [
        "model.layers.0.mlp.experts.down_proj",
        "model.layers.1.mlp.experts.down_proj",
    ]


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_merge_unmerge_and_unload_match_peft(family):
    """W_e ← W_e + s·B_e A_e into the 3-D weights (and the router's): outputs kept, unmerge
    restores W, unload(merge=True) equals peft's merge_and_unload."""
    kwargs = dict(KWARGS)
    if family == "gpt_oss":
        kwargs["target_parameters"] = ["gate_up_proj", "down_proj", "router.weight"]
    base = MOE_MODELS[family]()
    ids = tokens(batch=2, length=6)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    ours = copy.deepcopy(base)
    inject_adapters(ours, LoRAConfig(**kwargs))
    with torch.no_grad():
        for name, param in ours.named_parameters():  # peft's factors, ours in peft's layout
            if "lora_" in name:
                param.copy_(_saved_of(theirs)[_key(ours, name)])
        y = ours(ids).logits
        torch.testing.assert_close(y, theirs(ids).logits, rtol=1e-5, atol=1e-5)
        weights = {k: v.clone() for k, v in ours.state_dict().items()}
        merge_adapters(ours)
        torch.testing.assert_close(ours(ids).logits, y, rtol=1e-5, atol=1e-5)
        unmerge_adapters(ours)
        for key, value in ours.state_dict().items():
            torch.testing.assert_close(value, weights[key], rtol=1e-6, atol=1e-6, msg=key)
        merged = unload(ours, merge=True)
        assert not any(isinstance(m, LoRAExperts) for m in merged.modules())
        reference = theirs.merge_and_unload()
        for key, value in reference.state_dict().items():
            torch.testing.assert_close(merged.state_dict()[key], value, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(merged(ids).logits, y, rtol=1e-5, atol=1e-5)


def _saved_of(peft_model):
    return peft.get_peft_model_state_dict(peft_model)


def _key(model, name):
    from lightning_peft.peft_format.files import peft_keys

    return peft_keys(model, [name])[name]


def _nemotron_h():  # has_gate=False: up_proj and act_fn (relu²)
    from transformers import NemotronHConfig
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts

    return NemotronHExperts(
        NemotronHConfig(
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            moe_intermediate_size=16,
            n_routed_experts=4,
            moe_latent_size=None,
        )
    )


def _ergo():  # has_gate=False, is_transposed=True
    from transformers.models.ergo.configuration_ergo import ErgoConfig
    from transformers.models.ergo.modeling_ergo import ErgoExpertProjections

    config = ErgoConfig(
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        moe_intermediate_size=16,
        num_experts=4,
    )
    return ErgoExpertProjections(config)


def _muse_spark():  # has_post_expert_norm=True
    from transformers.models.muse_spark.configuration_muse_spark import MuseSparkTextConfig
    from transformers.models.muse_spark.modeling_muse_spark import MuseSparkExperts

    config = MuseSparkTextConfig(
        moe_hidden_size=32,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        moe_intermediate_size=16,
        num_local_experts=4,
    )
    return MuseSparkExperts(config)


FLAG_EXPERTS = {"nemotron_h": _nemotron_h, "ergo": _ergo, "muse_spark": _muse_spark}


def _experts_layer(family: str, dtype=torch.float64, **config) -> LoRAExperts:
    """The first layer's experts of a tiny model (or one of ``FLAG_EXPERTS``, random weights),
    adapted (random A and B) in ``dtype``."""
    if family in FLAG_EXPERTS:
        experts = FLAG_EXPERTS[family]()
        torch.manual_seed(0)
        with torch.no_grad():
            for param in experts.parameters():
                param.normal_(0, 0.2)
    else:
        experts = MOE_MODELS[family](**config).model.layers[0].mlp.experts
    experts = experts.to(dtype)
    experts.config._experts_implementation = "eager"
    up = "gate_up_proj" if experts.has_gate else "up_proj"
    lora = LoRAConfig(
        r=3,
        lora_alpha=4,
        target_modules=None,
        target_parameters=[up, "down_proj"],
        init_lora_weights=False,
        adapter_dtype=str(dtype).removeprefix("torch."),
    )
    return LoRAExperts.build(experts, lora, "experts")


def _materialised(layer: LoRAExperts, x, index, weights):
    """The reference: the module's own eager forward with W_e + s·B_e A_e for every expert
    (what peft computes), differentiable in A and B."""
    params = dict(layer.base_module.named_parameters())
    for local in layer.param_names:
        params[local] = params[local] + layer.delta_weight(local, params[local].dtype)
    return torch.func.functional_call(layer.base_module, params, (x, index, weights))


def _routing(tokens_: int, top_k: int, experts: list[int], seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    choices = torch.tensor(experts)
    index = torch.stack(
        [choices[torch.randperm(len(experts), generator=generator)[:top_k]] for _ in range(tokens_)]
    )
    weights = torch.rand(tokens_, top_k, generator=generator, dtype=torch.float64)
    return index, weights


@pytest.mark.parametrize(
    ("family", "config", "top_k", "reached"),
    [
        ("qwen3_moe", {}, 2, [0, 1, 3]),  # expert 2 gets no token
        ("qwen3_moe", {"num_experts": 1, "num_experts_per_tok": 1}, 1, [0]),  # E = 1
        ("mixtral", {}, 3, [0, 1, 2, 3]),  # top-3
        ("gpt_oss", {}, 2, [1, 2]),  # transposed, biases, interleaved gate; 2 idle experts
        ("nemotron_h", {}, 2, [0, 2, 3]),
        ("ergo", {}, 1, [0, 1, 2]),  # its eager forward takes one route per row, weight 1
        ("muse_spark", {}, 2, [0, 1, 3]),
    ],
)
def test_experts_forward_and_gradients_against_materialised_weights(family, config, top_k, reached):
    """float64: the routed grouped forward equals W + ΔW in transformers' eager loop; the
    gradients of x, A and B too, and experts no token reaches get exactly zero gradient. Every
    flag of ``@use_experts_implementation``: transposed with biases and an interleaved gate
    (gpt-oss), no gate (NemotronH; Ergo, transposed too), a post-expert norm (MuseSpark)."""
    layer = _experts_layer(family, **config)
    index, weights = _routing(7, top_k, reached)
    if family == "ergo":
        weights = torch.ones_like(weights)
    hidden = layer.experts_of(layer, "down_proj")[1]  # down_proj's out: the hidden size
    x = torch.randn(7, hidden, dtype=torch.float64, requires_grad=True)
    outputs, grads = [], []
    for run in (layer, lambda *a: _materialised(layer, *a)):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        y = run(x, index, weights)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        outputs.append(y.detach())
        grads.append(
            [x.grad.clone()]
            + [getattr(layer, n).grad.clone() for n in layer.adapter_parameter_names()]
        )
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-10, atol=1e-12)
    for ours, reference in zip(*grads, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)
    experts = layer.base_module.num_experts
    for idle in set(range(experts)) - set(reached):
        for local in layer.param_names:
            lora_A, lora_B = layer.factors(local)
            rank = layer.ranks[local]
            assert not lora_A.grad[idle * rank : (idle + 1) * rank].any()
            assert not lora_B.grad.view(lora_B.shape[0], rank, experts)[..., idle].any()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_experts_compile_without_graph_breaks(family):
    """torch.compile(fullgraph=True) of the adapted experts: forward and backward as eager."""
    layer = _experts_layer(family, dtype=torch.float32)
    index, weights = _routing(9, 2, [0, 1, 3])
    size = layer.base_module.gate_up_proj.shape[1 if layer.base_module.is_transposed else 2]
    x = torch.randn(9, size)
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    results = []
    for run in (layer, compiled):
        layer.zero_grad(set_to_none=True)
        x_ = x.clone().requires_grad_(True)
        y = run(x_, index, weights.float())
        y.square().sum().backward()
        results.append([y.detach(), x_.grad] + [getattr(layer, n).grad for n in layer.param_names])
    for eager, traced in zip(*results, strict=True):
        torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-6)


def test_lora_dropout_dora_lora_bias_refused_as_in_peft():
    """peft's ParamWrapper refuses them; so do we, by name, before touching the model."""
    base = MOE_MODELS["qwen3_moe"]()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    for option in ({"lora_dropout": 0.1}, {"use_dora": True}, {"lora_bias": True}):
        with pytest.raises(ValueError, match="does not work"):
            peft.get_peft_model(
                copy.deepcopy(base), peft.LoraConfig(target_modules="all-linear", **option)
            )
        with pytest.raises(ValueError, match=rf"{next(iter(option))}.*mlp\.experts"):
            inject_adapters(base, LoRAConfig(target_modules="all-linear", **option))
    with pytest.raises(ValueError, match=r"bias='all'.*target_parameters"):
        inject_adapters(base, LoRAConfig(target_modules="all-linear", bias="all"))
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    assert not any(isinstance(m, LoRAExperts) for m in base.modules())


@pytest.mark.parametrize(
    ("family", "targets", "message"),
    [
        ("gpt_oss", ["gate_up_proj_bias"], "adapts gate_up_proj and down_proj only"),
        ("qwen3_moe", ["nothing_here"], "no parameter matched"),
        ("qwen3_moe", ["embed_tokens.weight", "q_proj.weight"], None),  # 2-D: allowed
    ],
)
def test_target_parameters_refusals(family, targets, message):
    base = MOE_MODELS[family]()
    config = LoRAConfig(target_modules=None, target_parameters=targets)
    if message is None:
        assert inject_adapters(base, config).modules
        return
    with pytest.raises(ValueError, match=message):
        inject_adapters(base, config)


def test_module_and_its_parameter_both_targeted_is_refused():
    base = MOE_MODELS["qwen3_moe"]()
    config = LoRAConfig(target_modules=["q_proj"], target_parameters=["q_proj.weight"])
    with pytest.raises(ValueError, match="adapt it one way"):
        inject_adapters(base, config)


def test_expert_parallel_is_refused():
    base = MOE_MODELS["qwen3_moe"]()
    base.model.layers[1].mlp.experts._is_expert_parallel = True
    with pytest.raises(ValueError, match="expert parallelism"):
        inject_adapters(base, LoRAConfig(target_modules="all-linear"))


def test_a_three_d_parameter_outside_experts_is_refused():
    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Module()
            self.inner.stack = torch.nn.Parameter(torch.randn(2, 3, 4))

    with pytest.raises(ValueError, match="not a transformers experts module"):
        inject_adapters(Holder(), LoRAConfig(target_modules=None, target_parameters=["stack"]))


def test_no_expert_weight_sized_tensor_is_kept_for_backward():
    """The adapted experts keep nothing of ΔW's size for backward (peft keeps W + ΔW, E·out·in
    floats per parameter per layer): every saved tensor that is not a parameter is smaller than
    one expert stack."""
    layer = _experts_layer("qwen3_moe", dtype=torch.float32, num_experts=16)
    index, weights = _routing(6, 2, list(range(16)))
    stack = min(layer.gate_up_proj[0].numel(), layer.down_proj[0].numel()) * 16 * 4
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    saved = []

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in params:
            saved.append(tensor.untyped_storage().nbytes())
        return tensor

    x = torch.randn(6, 32, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        layer(x, index, weights.float()).sum().backward()
    assert saved and max(saved) < stack / 4, (max(saved), stack)
    assert layer.lora_A.grad is not None and layer.base_layer_lora_B.grad is not None


def test_base_keys_unchanged_and_gpt_oss_all_linear_says_what_it_leaves_out():
    base = MOE_MODELS["gpt_oss"]()
    keys = set(base.state_dict())
    report = inject_adapters(base, LoRAConfig(target_modules="all-linear"))
    assert {name for name, _ in report.skipped} == {
        "model.layers.0.mlp.experts",
        "model.layers.1.mlp.experts",
    }
    assert "target_parameters" in str(report)
    model = MOE_MODELS["qwen3_moe"]()
    keys = set(model.state_dict())
    inject_adapters(model, LoRAConfig(target_modules="all-linear"))
    added = set(model.state_dict()) - keys
    assert keys <= set(model.state_dict())
    assert added and all(".lora_" in k or "_lora_" in k for k in added)


@pytest.mark.slow
def test_fit_with_the_callback_trains_the_experts_and_peft_loads_the_result(tmp_path):
    """PEFTCallback on a LightningModule holding a tiny Qwen3-MoE: all-linear reaches the
    experts and the router through the wrapper, every expert's pair trains, and peft loads the
    adapter written at the end with our outputs."""
    from lightning_peft import PEFTCallback
    from tests.helpers.lightning_modules import PlainCausalLM, trainer

    class MoECausalLM(PlainCausalLM):
        def build_model(self):
            return MOE_MODELS["qwen3_moe"](vocab_size=128).train()

    module = MoECausalLM(lr=1e-2)
    callback = PEFTCallback(
        LoRAConfig(r=4, target_modules="all-linear"), save_adapter_to=tmp_path / "a"
    )
    trainer(tmp_path, [callback], max_steps=8).fit(module)
    layers = [m for m in module.model.modules() if isinstance(m, LoRAExperts)]
    assert len(layers) == 2
    for layer in layers:  # B starts at zero: every expert pair has been trained
        for local in layer.param_names:
            assert layer.factors(local)[1].abs().amax(dim=0).gt(0).all()
    assert read_config(tmp_path / "a").target_parameters
    theirs = peft.PeftModel.from_pretrained(MOE_MODELS["qwen3_moe"](vocab_size=128), tmp_path / "a")
    ids = tokens(batch=2, length=6)
    module.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            theirs.eval()(ids).logits, module.model(ids).logits, rtol=1e-5, atol=1e-5
        )


def test_disable_adapters_runs_the_base_experts():
    from lightning_peft import disable_adapters

    base = MOE_MODELS["mixtral"]()
    ids = tokens(batch=2, length=6)
    with torch.no_grad():
        expected = base(ids).logits
        inject_adapters(base, LoRAConfig(target_modules="all-linear", init_lora_weights=False))
        adapted = base(ids).logits
        with disable_adapters(base):
            torch.testing.assert_close(base(ids).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(base(ids).logits, adapted, rtol=0, atol=0)
    assert (adapted - expected).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_bfloat16_model_error_within_twice_peft_s(family):
    """A bfloat16 model with float32 adapters: against the same adapter in float64, our logits'
    error is at most twice peft's (which adds ΔW in bfloat16)."""
    kwargs = dict(KWARGS, target_parameters=["gate_up_proj", "down_proj"])
    base = MOE_MODELS[family]()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    ours = copy.deepcopy(base)
    inject_adapters(ours, LoRAConfig(**kwargs))
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if "lora_" in name:
                param.copy_(_saved_of(theirs)[_key(ours, name)])
    reference = copy.deepcopy(ours).to(torch.float64)
    for param in reference.parameters():  # the adapters too (they keep their dtype in .to)
        param.data = param.data.to(torch.float64)
    ids = tokens(batch=2, length=6)
    with torch.no_grad():
        exact = reference(ids).logits
        ours.to(torch.bfloat16)
        theirs.to(torch.bfloat16)
        error_ours = (ours(ids).logits.double() - exact).abs().max()
        error_theirs = (theirs(ids).logits.double() - exact).abs().max()
    assert error_ours <= 2 * error_theirs, (float(error_ours), float(error_theirs))


def test_a_one_d_parameter_is_refused():
    base = MOE_MODELS["qwen3_moe"]()
    config = LoRAConfig(target_modules=None, target_parameters=["model.norm.weight"])
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' has shape \(32,\)"):
        inject_adapters(base, config)
