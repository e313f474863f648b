"""QLoRA: LoRA and DoRA over bitsandbytes ``Linear4bit`` (nf4/fp4, with and without double
quantization, float32/bfloat16 compute) and ``Linear8bitLt``, against float64 math on the
de-quantized weight and against peft's own QLoRA layers; interop both ways on a 4-bit tiny Llama;
merge, unload, state dicts, refusals, memory, and the missing-extra error."""

import copy
import sys
from collections import OrderedDict

import pytest
import torch
from torch import nn

from lightning_peft import (
    LoRAConfig,
    adapter_state_dict,
    disable_adapters,
    inject_adapters,
    load_adapter,
    merge_adapters,
    save_adapter,
    unload,
    unmerge_adapters,
)
from lightning_peft.core.bnb import (
    EXTRA_HINT,
    MissingExtraError,
    bitsandbytes_kind,
    dequantized_rows,
    dequantized_weight,
    quantized_row_sq_norm,
)
from lightning_peft.lightning.precision import bitsandbytes_config, load_quantized
from lightning_peft.methods.lora.quantized import QuantizedLoRALinear
from lightning_peft.methods.registry import adapter_layers
from tests.helpers.quantized_models import (
    FORMATS_4BIT,
    NEEDS_BNB,
    QuantizedSmallModel,
    linear_4bit,
    linear_8bit,
    load_tiny_4bit,
    no_cpu_packing,
    save_tiny_llama,
)
from tests.helpers.reference import max_rel_error, reference_with_grads
from tests.helpers.tiny_models import logits, snapshot, tokens
from tests.peft_kernels.test_memory import saved_storages

TOLERANCE = 2e-5  # float32 compute, scale-free (as tests/test_ops.py)


def make_layer(base, *, r=3, use_dora=False, dropout=0.0, seed=1):
    """A QLoRA layer over ``base`` with random A, B (and m), so every tensor acts."""
    layer = QuantizedLoRALinear(
        base, r, 2 * r, use_dora=use_dora, dropout=dropout, init_lora_weights=False
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=gen) / 3)
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) / 3)
        if use_dora:
            layer.lora_magnitude.mul_(1 + 0.2 * torch.rand(layer.out_features, generator=gen))
    return layer.train()


def reference_inputs(layer, x):
    """The layer's tensors as ``tests/reference.py`` takes them, W = the de-quantized weight."""
    inputs = {
        "x": x,
        "weight": dequantized_weight(layer.base_layer, torch.float32),
        "bias": layer.bias,
        "lora_A": layer.lora_A,
        "lora_B": layer.lora_B,
        "scaling": layer.scaling,
    }
    if layer.use_dora:
        inputs["magnitude"] = layer.lora_magnitude
    return inputs


def check_against_float64(layer, x, keep=None, p=0.0, tol=TOLERANCE):
    """Output and gradients (x, A, B, m, a trainable bias) against float64 math."""
    y = layer(x)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(y.device)
    inputs = reference_inputs(layer, x)
    names = [k for k, v in inputs.items() if torch.is_tensor(v) and v.requires_grad]
    got = torch.autograd.grad(y, [inputs[k] for k in names], grad_y)
    ref_y, ref_grads = reference_with_grads(
        "dora" if layer.use_dora else "lora", inputs, grad_y, keep, p
    )
    assert max_rel_error(y, ref_y) < tol, "output"
    for name, grad in zip(names, got, strict=True):
        assert max_rel_error(grad, ref_grads[name]) < tol, f"grad of {name}"


# -- the layer against float64 math ---------------------------------------------------------------


@NEEDS_BNB
@pytest.mark.parametrize(("quant_type", "double_quant"), FORMATS_4BIT)
@pytest.mark.parametrize("use_dora", [False, True])
def test_4bit_layer_matches_float64_math_on_the_dequantized_weight(
    quant_type, double_quant, use_dora
):
    _, base = linear_4bit(37, 29, quant_type=quant_type, double_quant=double_quant)
    layer = make_layer(base, use_dora=use_dora)
    x = torch.randn(2, 5, 37, requires_grad=True)
    check_against_float64(layer, x)
    assert layer.weight.dtype == torch.uint8 and layer.weight is base.weight  # still quantized


@NEEDS_BNB
@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize(("bias", "rank"), [(False, 1), (True, 4)])
def test_8bit_layer_matches_float64_math_on_the_dequantized_weight(use_dora, bias, rank):
    _, base = linear_8bit(26, 21, bias=bias)
    layer = make_layer(base, use_dora=use_dora, r=rank)
    x = torch.randn(3, 4, 26, requires_grad=True)
    check_against_float64(layer, x)  # training: bitsandbytes computes x·(CB·SCB/127)ᵀ + b
    assert layer.weight.dtype == torch.int8


@NEEDS_BNB
def test_a_trainable_base_bias_gets_its_gradient():
    _, base = linear_4bit(12, 10)
    base.bias.requires_grad_(True)
    for use_dora in (False, True):
        check_against_float64(
            make_layer(copy.deepcopy(base), use_dora=use_dora), torch.randn(6, 12)
        )


@NEEDS_BNB
def test_lora_dropout_matches_float64_math_with_the_same_mask():
    from tests.peft_kernels.test_qlora_ops import seeded_mask

    _, base = linear_4bit(24, 18)
    layer = make_layer(base, dropout=0.3)
    x = torch.randn(7, 24, requires_grad=True)
    keep = seeded_mask(11, tuple(x.shape), 0.3)
    torch.manual_seed(11)  # lora_delta draws its dropout seed first
    y = layer(x)
    torch.manual_seed(11)
    torch.testing.assert_close(layer(x), y)  # the seed decides the mask
    inputs = reference_inputs(layer, x)
    ref_y, _ = reference_with_grads("lora", inputs, torch.ones_like(y), keep, 0.3)
    assert max_rel_error(y, ref_y) < TOLERANCE


# -- the layer against peft's QLoRA layers -------------------------------------------------------


def peft_twin(layer, base):
    """peft's LoRA/DoRA layer over a copy of ``base``, holding ``layer``'s adapter tensors."""
    peft = pytest.importorskip("peft")
    model = nn.Sequential(OrderedDict(proj=copy.deepcopy(base)))
    config = peft.LoraConfig(
        r=layer.r,
        lora_alpha=layer.lora_alpha,
        target_modules=["proj"],
        use_dora=layer.use_dora,
        lora_dropout=layer.dropout_p,
    )
    model = no_cpu_packing(peft.get_peft_model(model, config))
    twin = model.base_model.model.proj
    with torch.no_grad():
        twin.lora_A["default"].weight.copy_(layer.lora_A)
        twin.lora_B["default"].weight.copy_(layer.lora_B)
        if layer.use_dora:
            twin.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude)
    return model.train(layer.training), twin


def their_grads(twin):
    grads = {
        "lora_A": twin.lora_A["default"].weight.grad,
        "lora_B": twin.lora_B["default"].weight.grad,
    }
    if "default" in twin.lora_magnitude_vector:
        grads["lora_magnitude"] = twin.lora_magnitude_vector["default"].weight.grad
    return grads


def check_against_peft(layer, base, x, rtol=1e-5, atol=1e-6, seed=None):
    model, twin = peft_twin(layer, base)
    layer.zero_grad()
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    if seed is not None:
        torch.manual_seed(seed)
    y_ours = layer(x_ours)
    if seed is not None:
        torch.manual_seed(seed)
    y_theirs = model(x_theirs)
    torch.testing.assert_close(y_ours, y_theirs, rtol=rtol, atol=atol)
    grad_y = torch.randn(y_ours.shape, generator=torch.Generator().manual_seed(4)).to(x.device)
    y_ours.backward(grad_y)
    y_theirs.backward(grad_y)
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=rtol, atol=atol)
    for name, grad in their_grads(twin).items():
        ours = layer.get_parameter(name).grad
        torch.testing.assert_close(ours, grad.view_as(ours), rtol=rtol, atol=atol, msg=name)
    return (y_ours - y_theirs).abs().max().item()


@NEEDS_BNB
@pytest.mark.parametrize(("quant_type", "double_quant"), FORMATS_4BIT)
@pytest.mark.parametrize("use_dora", [False, True])
def test_4bit_layer_equals_peft(quant_type, double_quant, use_dora):
    _, base = linear_4bit(40, 24, quant_type=quant_type, double_quant=double_quant)
    layer = make_layer(copy.deepcopy(base), use_dora=use_dora)
    check_against_peft(layer, base, torch.randn(2, 6, 40))
    layer.eval()
    check_against_peft(layer, base, torch.randn(5, 40))


@NEEDS_BNB
@pytest.mark.parametrize("use_dora", [False, True])
def test_bfloat16_compute_dtype_equals_peft(use_dora):
    """Compute dtype bfloat16: the base product is rounded to bf16 by bitsandbytes, in both."""
    _, base = linear_4bit(48, 32, compute_dtype=torch.bfloat16)
    layer = make_layer(copy.deepcopy(base), use_dora=use_dora)
    check_against_peft(layer, base, torch.randn(3, 48), rtol=1e-4, atol=1e-5)
    x = torch.randn(3, 48, dtype=torch.bfloat16)  # a bf16 model: adapters compute in bf16
    model, _ = peft_twin(layer, base)
    torch.testing.assert_close(layer(x), model(x), rtol=2e-2, atol=2e-2)
    assert layer(x).dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32


@NEEDS_BNB
@pytest.mark.parametrize("use_dora", [False, True])
def test_8bit_layer_equals_peft(use_dora):
    _, base = linear_8bit(40, 24)
    layer = make_layer(copy.deepcopy(base), use_dora=use_dora)
    check_against_peft(layer, base, torch.randn(2, 6, 40))
    layer.eval()  # inference: bitsandbytes' int8 matmul quantizes x too, in both
    check_against_peft(layer, base, torch.randn(5, 40), rtol=1e-4, atol=1e-5)


@NEEDS_BNB
def test_dora_dropout_equals_peft():
    """peft's dropout-on DoRA: the same torch dropout mask in both, drawn once per forward."""
    _, base = linear_4bit(30, 20)
    layer = make_layer(copy.deepcopy(base), use_dora=True, dropout=0.25)
    check_against_peft(layer, base, torch.randn(9, 30), seed=7)


@pytest.mark.cuda
@NEEDS_BNB
@pytest.mark.parametrize(("quant_type", "double_quant"), FORMATS_4BIT)
@pytest.mark.parametrize("use_dora", [False, True])
def test_cuda_4bit_layer_matches_float64_math_and_peft(quant_type, double_quant, use_dora):
    """On the GPU (bitsandbytes' CUDA kernels): float64 math on the de-quantized weight, peft's
    layer, and the row chunks against bitsandbytes' own de-quantization."""
    import bitsandbytes as bnb

    _, base = linear_4bit(70, 45, quant_type=quant_type, double_quant=double_quant, device="cuda")
    whole = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state)
    chunks = torch.cat([rows for _, rows in dequantized_rows(base, max_elements=40)])
    torch.testing.assert_close(chunks, whole, rtol=0, atol=0)
    layer = make_layer(copy.deepcopy(base), use_dora=use_dora)
    x = torch.randn(3, 9, 70, device="cuda", requires_grad=True)
    check_against_float64(layer, x, tol=1e-4)  # bitsandbytes' fused 4-bit GEMM
    check_against_peft(layer, base, torch.randn(3, 9, 70, device="cuda"), rtol=1e-4, atol=1e-5)


# -- interop on a 4-bit tiny Llama, both ways ----------------------------------------------------


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@NEEDS_BNB
@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_interop_with_peft_both_ways_on_a_4bit_llama(llama_dir, use_dora, mode, tmp_path):
    peft = pytest.importorskip("peft")
    ids = tokens()
    config = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    # Ours -> peft: trained here (one step), loaded by peft over the same quantized base.
    ours = load_tiny_4bit(llama_dir, mode)
    inject_adapters(ours, LoRAConfig(use_dora=use_dora, **config))
    torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1).zero_grad()
    ours.train()
    ours(input_ids=ids, labels=ids).loss.backward()
    torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1).step()
    save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(load_tiny_4bit(llama_dir, mode), tmp_path / "ours")
    ours.eval()
    with torch.no_grad():
        diff = (logits(ours, ids) - logits(theirs.eval(), ids)).abs().max().item()
    print(f"ours -> peft ({mode}, {'DoRA' if use_dora else 'LoRA'}): max |Δlogits| = {diff:.2e}")
    assert diff < 2e-5
    # peft -> ours: peft's QLoRA adapter over its quantized base, loaded here.
    theirs = peft.get_peft_model(
        load_tiny_4bit(llama_dir, mode), peft.LoraConfig(use_dora=use_dora, **config)
    )
    theirs.save_pretrained(tmp_path / "theirs")
    mine = load_adapter(load_tiny_4bit(llama_dir, mode), tmp_path / "theirs")
    assert all(isinstance(layer, QuantizedLoRALinear) for _, layer in adapter_layers(mine))
    with torch.no_grad():
        diff = (logits(mine.eval(), ids) - logits(theirs.eval(), ids)).abs().max().item()
    print(f"peft -> ours ({mode}, {'DoRA' if use_dora else 'LoRA'}): max |Δlogits| = {diff:.2e}")
    assert diff < 2e-5


@NEEDS_BNB
def test_only_adapters_train_and_the_base_stays_quantized(llama_dir):
    model = load_tiny_4bit(llama_dir)
    before = snapshot(model)
    report = inject_adapters(model, LoRAConfig(r=4, target_modules="all-linear", use_dora=True))
    adapters = set(adapter_state_dict(model))
    assert set(model.state_dict()) - set(before) == adapters  # quantization entries unchanged
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = tokens()
    for _ in range(2):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all(not torch.equal(after[k], torch.zeros_like(after[k])) for k in adapters)
    # The report counts the 4-bit weights' values, not their packed bytes.
    float_params = sum(p.numel() for p in load_quantized_as_float(llama_dir).parameters())
    assert report.total_params == float_params + report.trainable_params


def load_quantized_as_float(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory)


@NEEDS_BNB
def test_training_after_an_eval_forward_still_reaches_the_input(llama_dir):
    """On AVX512-BF16 CPUs bitsandbytes 0.50 repacks a bare Linear4bit's weight for bf16
    inference on an eval forward, after which it gives its input no gradient (and for an output
    size that is no multiple of 32, k_proj/v_proj here, it fails). Injection keeps every
    bitsandbytes layer of the model in the standard layout, adapted (q_proj) or not."""
    ids = tokens()
    fresh = load_quantized(llama_dir, "nf4")
    inject_adapters(fresh, LoRAConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    evaluated = copy.deepcopy(fresh)
    with torch.no_grad():
        evaluated.eval()(input_ids=ids)  # a validation pass
    for model in (fresh, evaluated):
        model.train()(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in fresh.named_parameters() if p.requires_grad}
    for name, param in evaluated.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads[name], msg=name)


# -- merge and unload ---------------------------------------------------------------------------


@NEEDS_BNB
@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_holds_a_float_weight_and_unmerge_restores_the_quantized_base(kind, use_dora):
    base = QuantizedSmallModel(kind)
    model = copy.deepcopy(base)
    config = LoRAConfig(
        r=2, target_modules=["proj", "proj_nobias"], use_dora=use_dora, init_lora_weights=False
    )
    inject_adapters(model, config)
    before = snapshot(model)
    x = torch.randn(4, 11)
    with torch.no_grad():
        y = model(x)
        with pytest.warns(UserWarning, match=r"de-quantizes it: it now also holds a torch\.float"):
            merge_adapters(model)
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-6)
        for _, layer in adapter_layers(model):
            assert layer.merged and layer.merged_weight.dtype == torch.float32
        unmerge_adapters(model)
        torch.testing.assert_close(model(x), y, rtol=0, atol=0)  # the base was never touched
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    # unload(merge=True): the export path, a float model.
    with pytest.warns(UserWarning, match="de-quantizes it"):
        exported = unload(copy.deepcopy(model), merge=True)
    assert not any(bitsandbytes_kind(m) for m in exported.modules())
    assert type(exported.proj) is nn.Linear and exported.proj.weight.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(exported(x), y, rtol=1e-5, atol=1e-6)
    # unload(merge=False): the quantized model again, every key and value as before.
    restored = unload(model, merge=False)
    assert restored.state_dict().keys() == base.state_dict().keys()
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in restored.state_dict().items())
    assert [type(m) for m in restored.modules()] == [type(m) for m in base.modules()]
    with torch.no_grad():
        torch.testing.assert_close(restored(x), base(x), rtol=0, atol=0)


@NEEDS_BNB
def test_disabled_adapters_give_the_quantized_base():
    base = QuantizedSmallModel()
    model = copy.deepcopy(base)
    inject_adapters(model, LoRAConfig(r=2, target_modules=["proj"], init_lora_weights=False))
    x = torch.randn(3, 11)
    with torch.no_grad(), disable_adapters(model):
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)


@NEEDS_BNB
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_dora_decoding_reuses_the_norm_and_equals_the_recorded_forward(kind, monkeypatch):
    """Forwards without autograd reuse DoRA's norm (no de-quantization of W per decoded token)
    until A changes, and give the recorded forward's output exactly, under bf16 autocast too."""
    import lightning_peft.methods.lora.quantized as lora_quantized

    _, base = linear_4bit(40, 24) if kind == "nf4" else linear_8bit(40, 24)
    layer = make_layer(base, use_dora=True).eval()
    products = []
    counted = lora_quantized.quantized_weight_times
    monkeypatch.setattr(
        lora_quantized,
        "quantized_weight_times",
        lambda *args: products.append(1) or counted(*args),
    )
    x = torch.randn(2, 3, 40)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            recorded = layer(x).detach()
            with torch.no_grad():
                before = len(products)
                decoded = [layer(x) for _ in range(3)]
                assert len(products) == before + 1  # once, then reused
                layer.lora_A.mul_(1.0)  # a version bump: computed again
                assert torch.equal(layer(x), decoded[0]) and len(products) == before + 2
        for y in decoded:
            torch.testing.assert_close(y, recorded, rtol=0, atol=0)


# -- state dicts, dtypes -------------------------------------------------------------------------


@NEEDS_BNB
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_state_dict_keeps_the_base_keys_and_loads_as_the_base_does(kind):
    """The frozen keys and values are the base's (bitsandbytes' quantization entries included),
    and a state dict loads into the adapted model as into the base: strictly for int8; for 4-bit
    bitsandbytes' own layer reports its quantization entries as unexpected, and so do we."""
    base = QuantizedSmallModel(kind)
    model = copy.deepcopy(base)
    inject_adapters(model, LoRAConfig(r=2, target_modules=["proj", "proj_nobias"], use_dora=True))
    state, base_state = model.state_dict(), base.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base_state.items())
    other = copy.deepcopy(model)
    with torch.no_grad():
        for _, layer in adapter_layers(other):
            layer.lora_A.zero_()
    ours = other.load_state_dict(state, strict=False)
    theirs = copy.deepcopy(base).load_state_dict(base_state, strict=False)
    assert ours.unexpected_keys == theirs.unexpected_keys and not ours.missing_keys
    assert (kind == "int8") == (not ours.unexpected_keys)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in state.items())


@NEEDS_BNB
def test_adapters_keep_their_dtype_and_the_base_stays_packed_through_model_to():
    model = QuantizedSmallModel()
    inject_adapters(model, LoRAConfig(r=2, target_modules=["proj"], use_dora=True))
    model.to(torch.bfloat16)
    layer = model.proj
    assert layer.lora_A.dtype == torch.float32 and layer.weight_sq_norm.dtype == torch.float32
    assert layer.weight.dtype == torch.uint8 and layer.base_layer.weight is layer.weight
    assert model(torch.randn(2, 11, dtype=torch.bfloat16)).dtype == torch.bfloat16


# -- de-quantization in row chunks ---------------------------------------------------------------


@NEEDS_BNB
@pytest.mark.parametrize(("quant_type", "double_quant"), FORMATS_4BIT)
# Chunks hold whole 64-value blocks: 64 rows of 11 (one chunk here), 32 rows of 70, 1 row of 64.
@pytest.mark.parametrize(
    ("in_features", "out_features", "n_chunks"), [(11, 9, 1), (70, 33, 2), (64, 5, 5)]
)
def test_row_chunks_equal_bitsandbytes_dequantization(
    quant_type, double_quant, in_features, out_features, n_chunks
):
    import bitsandbytes as bnb

    _, layer = linear_4bit(
        in_features, out_features, quant_type=quant_type, double_quant=double_quant
    )
    whole = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    chunks = list(dequantized_rows(layer, max_elements=40))
    assert len(chunks) == n_chunks
    torch.testing.assert_close(torch.cat([rows for _, rows in chunks]), whole, rtol=0, atol=0)
    sq_norm = quantized_row_sq_norm(layer)
    torch.testing.assert_close(sq_norm, whole.square().sum(1), rtol=1e-6, atol=0)


@NEEDS_BNB
def test_8bit_rows_equal_bitsandbytes_dequantization():
    import bitsandbytes as bnb

    _, layer = linear_8bit(30, 17)
    whole = bnb.functional.int8_vectorwise_dequant(layer.weight.data, layer.weight.SCB)
    torch.testing.assert_close(dequantized_weight(layer), whole, rtol=1e-6, atol=0)
    layer(torch.randn(2, 30))  # SCB moves from the weight to the matmul state
    torch.testing.assert_close(dequantized_weight(layer), whole, rtol=1e-6, atol=0)


# -- memory -------------------------------------------------------------------------------------


@NEEDS_BNB
@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("use_dora", [False, True])
def test_no_full_precision_weight_is_saved_or_kept(kind, use_dora):
    m, in_features, out_features, rank = 7, 96, 80, 3
    _, base = (
        linear_8bit(in_features, out_features)
        if kind == "int8"
        else linear_4bit(in_features, out_features)
    )
    layer = make_layer(base, use_dora=use_dora, r=rank)
    x = torch.randn(m, in_features, requires_grad=True)
    saved = saved_storages(lambda: layer(x), list(layer.parameters()))
    shapes = sorted(shape for shape, _, _ in saved.values())
    expected = [(m, in_features), (m, rank)]  # x and u
    if use_dora:
        expected += [(m, out_features), (out_features,)]  # z and the norm
    assert shapes == sorted(expected)
    held = [*layer.parameters(), *layer.buffers()]
    assert not any(t.is_floating_point() and t.numel() >= out_features * in_features for t in held)


# -- refusals -----------------------------------------------------------------------------------


def snapshot_keys(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@NEEDS_BNB
def test_unquantized_and_fp16_weight_layers_are_refused_by_name():
    import bitsandbytes as bnb

    model = nn.Sequential(OrderedDict(q_proj=bnb.nn.Linear4bit(8, 8), out=nn.Linear(8, 2)))
    with pytest.raises(ValueError, match="target 'q_proj' is a bitsandbytes Linear4bit whose "):
        inject_adapters(model, LoRAConfig(r=2, target_modules=["q_proj"]))
    model = nn.Sequential(OrderedDict(q_proj=bnb.nn.Linear8bitLt(8, 8), out=nn.Linear(8, 2)))
    with pytest.raises(ValueError, match="has_fp16_weights=True"):
        inject_adapters(model, LoRAConfig(r=2, target_modules=["q_proj"]))
    assert type(model.q_proj) is bnb.nn.Linear8bitLt


@NEEDS_BNB
@pytest.mark.parametrize(
    "config",
    [
        LoRAConfig(r=2, target_modules=["proj"], bias="all"),  # peft's rule: "bias" in the name
        LoRAConfig(r=2, target_modules=["proj"], modules_to_save=["proj_nobias"]),
    ],
)
def test_a_quantized_weight_asked_to_train_in_full_is_refused_before_any_change(config):
    model = QuantizedSmallModel()
    before = snapshot_keys(model)
    with pytest.raises(
        ValueError, match=r"^'proj_nobias\.weight' would train in full .* torch\.uint8"
    ):
        inject_adapters(model, config)
    assert type(model.proj) is type(QuantizedSmallModel().proj)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@NEEDS_BNB
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_inits_that_rewrite_the_base_are_refused_by_name(init):
    model = QuantizedSmallModel()
    before = snapshot_keys(model)
    with pytest.raises(ValueError, match=f"init_lora_weights='{init}' rewrites the base weight"):
        inject_adapters(model, LoRAConfig(r=2, target_modules=["proj"], init_lora_weights=init))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@NEEDS_BNB
def test_lora_bias_over_a_quantized_base_is_refused_by_name():
    model = QuantizedSmallModel()
    with pytest.raises(ValueError, match="lora_bias=True over 'proj', a bitsandbytes Linear4bit"):
        inject_adapters(model, LoRAConfig(r=2, target_modules=["proj"], lora_bias=True))
    assert type(model.proj) is type(QuantizedSmallModel().proj)


@NEEDS_BNB
def test_dora_over_a_quantized_zero_row_is_refused():
    linear, _ = linear_4bit(16, 6)
    with torch.no_grad():
        linear.weight[2].zero_()
    import bitsandbytes as bnb

    quantized = bnb.nn.Linear4bit(16, 6, quant_type="nf4")
    quantized.load_state_dict(linear.state_dict())
    model = nn.Sequential(OrderedDict(proj=quantized.to("cpu")))
    with pytest.raises(ValueError, match="DoRA cannot adapt 'proj': row 2 of its weight"):
        inject_adapters(model, LoRAConfig(r=2, target_modules=["proj"], use_dora=True))


@NEEDS_BNB
def test_other_bitsandbytes_layers_are_refused_by_name():
    import bitsandbytes as bnb

    model = nn.Sequential(OrderedDict(q_proj=bnb.nn.OutlierAwareLinear(8, 8)))
    with pytest.raises(ValueError) as error:
        inject_adapters(model, LoRAConfig(r=2, target_modules=["q_proj"]))
    assert str(error.value).startswith("target 'q_proj' is a bitsandbytes OutlierAwareLinear")
    assert "and bitsandbytes' Linear4bit/Linear8bitLt: narrow target_modules" in str(error.value)


# -- the optional extra -------------------------------------------------------------------------


def test_quantization_without_bitsandbytes_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    for ask in (
        lambda: bitsandbytes_config("nf4"),
        lambda: load_quantized(tmp_path / "model", "int8"),
    ):
        with pytest.raises(MissingExtraError) as error:
            ask()
        message = str(error.value)
        assert "\n" not in message and message.endswith(EXTRA_HINT)
        assert EXTRA_HINT == "pip install lightning-peft[qlora]"
    assert not (tmp_path / "model").exists()


def test_an_unknown_quantize_mode_is_refused_before_anything_else(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ValueError, match="quantize mode must be one of nf4, fp4, int8, got 'q3'"):
        load_quantized(tmp_path, "q3")


@NEEDS_BNB
def test_load_quantized_refuses_a_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_quantized(tmp_path / "nope", "nf4")


# -- the embedded SmolLM2-135M (slow) ------------------------------------------------------------


@NEEDS_BNB
@pytest.mark.slow
def test_smollm2_nf4_ours_and_peft_agree_and_a_step_lowers_the_loss(tmp_path):
    """The real model: ours over transformers' nf4 SmolLM2 equals peft's QLoRA on the same base,
    and a few QLoRA steps on one batch lower its loss."""
    peft = pytest.importorskip("peft")
    from lightning_peft.cli.embedded import smollm2_path

    directory = smollm2_path()
    ids = torch.randint(0, 49152, (2, 32), generator=torch.Generator().manual_seed(0))
    ours = load_tiny_4bit(directory, "nf4")
    config = dict(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    inject_adapters(ours, LoRAConfig(use_dora=True, **config))
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(load_tiny_4bit(directory, "nf4"), tmp_path)
    with torch.no_grad():
        diff = (logits(ours.eval(), ids) - logits(theirs.eval(), ids)).abs().max().item()
    print(f"SmolLM2 nf4 QDoRA, ours -> peft: max |Δlogits| = {diff:.2e}")
    assert diff < 1e-3  # logits of size ~20, 30 layers of float32
    optimizer = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-3)
    ours.train()
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = ours(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
