"""PEFTCallback over a quantized base, both routes: Lightning's ``BitsandbytesPrecision`` (the
callback quantizes the base before it injects) and a model loaded 4-bit by transformers. Only the
adapters change, checkpoints hold only them, resume is exact, ``save_adapter_to`` writes an
adapter that peft loads over the same 4-bit base with equal outputs.

Lightning refuses ``BitsandbytesPrecision`` off CUDA at ``Trainer`` construction ("Bitsandbytes is
only supported on CUDA GPUs"), though bitsandbytes 0.50 quantizes and trains on the CPU; the
``lift_cuda_only_check`` fixture lifts exactly that check so the real hook order runs here."""

import copy

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_peft import AdapterConfig, LoRAConfig, PEFTCallback, adapter_state_dict
from lightning_peft.core.bnb import bitsandbytes_kind
from lightning_peft.lightning.precision import load_quantized
from lightning_peft.methods.lora.quantized import QuantizedLoRALinear
from lightning_peft.methods.registry import adapter_layers
from tests.helpers import lightning_modules
from tests.helpers.lightning_modules import (
    CaptureOnTrainEnd,
    CaptureOnTrainStart,
    CausalLM,
    random_tokens,
)
from tests.helpers.quantized_models import NEEDS_BNB, no_cpu_packing

pytestmark = NEEDS_BNB

CONFIGS = {
    "lora": LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "dora": LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True),
    "adapter": AdapterConfig(bottleneck_dim=8, target_modules=["mlp"]),
}


@pytest.fixture
def lift_cuda_only_check(monkeypatch):
    from lightning.pytorch.plugins import BitsandbytesPrecision
    from lightning.pytorch.trainer.connectors.accelerator_connector import _AcceleratorConnector

    validate = _AcceleratorConnector._validate_precision_choice

    def validate_all_but_cuda_only(self):
        plugin = self._precision_plugin_flag
        if isinstance(plugin, BitsandbytesPrecision):
            self._precision_plugin_flag = None
        try:
            validate(self)
        finally:
            self._precision_plugin_flag = plugin

    monkeypatch.setattr(
        _AcceleratorConnector, "_validate_precision_choice", validate_all_but_cuda_only
    )


def nf4_dq(**kwargs):
    from lightning.pytorch.plugins import BitsandbytesPrecision

    return BitsandbytesPrecision("nf4-dq", dtype=torch.float32, **kwargs)


def trainer(tmp_path, callbacks, max_steps=4, **kwargs):
    return lightning_modules.trainer(tmp_path, callbacks, max_steps, **kwargs)


class Snapshot(Callback):
    """Every state-dict tensor at the start and the end of training."""

    def on_train_start(self, trainer, pl_module):
        self.start = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def on_train_end(self, trainer, pl_module):
        self.end = {k: v.clone() for k, v in pl_module.state_dict().items()}


def check_only_adapters_changed(module, snapshot, ckpt_path):
    adapters = adapter_state_dict(module)
    assert snapshot.start.keys() == snapshot.end.keys()
    for key, value in snapshot.start.items():
        if key in adapters:
            assert not torch.equal(snapshot.end[key], value), key  # trained
        else:
            assert torch.equal(snapshot.end[key], value), key  # frozen: bit-identical
    assert all(t.dtype == torch.float32 for t in adapters.values())
    saved = torch.load(ckpt_path, weights_only=False)
    assert set(saved["state_dict"]) == set(adapters)


def check_resume(tmp_path, make_module, config, make_plugin=None):
    def run(callbacks, max_steps):
        plugins = [make_plugin()] if make_plugin else None
        return trainer(tmp_path, callbacks, max_steps, plugins=plugins)

    first_end = CaptureOnTrainEnd()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=2)
    run([PEFTCallback(copy.deepcopy(config)), ckpt, first_end], 2).fit(make_module())
    torch.manual_seed(123)  # fresh adapters in the new run: the checkpoint must overwrite them
    start = CaptureOnTrainStart()
    second = run([PEFTCallback(copy.deepcopy(config)), start], 3)
    second.fit(make_module(), ckpt_path=ckpt.last_model_path)
    assert start.step == 2 and start.adapters.keys() == first_end.adapters.keys()
    for key, value in first_end.adapters.items():
        assert torch.equal(start.adapters[key], value), key
    saved, restored = first_end.optimizer["state"], start.optimizer["state"]
    assert saved.keys() == restored.keys() and saved
    for index, state in saved.items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(restored[index][name]), torch.as_tensor(value))


# -- Lightning's BitsandbytesPrecision ----------------------------------------------------------


@pytest.mark.parametrize("method", list(CONFIGS))
def test_bitsandbytes_precision_quantizes_the_base_never_the_adapters(
    lift_cuda_only_check, tmp_path, method
):
    module = CausalLM()
    snapshot = Snapshot()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    callbacks = [PEFTCallback(copy.deepcopy(CONFIGS[method])), snapshot, ckpt]
    trainer(tmp_path, callbacks, plugins=nf4_dq()).fit(module)
    check_only_adapters_changed(module, snapshot, ckpt.last_model_path)
    attention = module.model.model.layers[0].self_attn
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        base = getattr(attention, name)
        base = base.base_layer if isinstance(base, QuantizedLoRALinear) else base
        assert bitsandbytes_kind(base) == "4bit" and base.weight.dtype == torch.uint8, name
    layers = [layer for _, layer in adapter_layers(module)]
    assert len(layers) == 4 if method != "adapter" else len(layers) == 2
    for layer in layers:  # an adapter's own tensors are float, its nn.Linear never swapped
        assert not any(bitsandbytes_kind(m) for m in layer.modules())
        assert all(p.dtype == torch.float32 for p in layer.parameters() if p.requires_grad)
    assert all(torch.isfinite(torch.tensor(module.losses)))


@pytest.mark.parametrize(
    ("mode", "dtype", "stored"),
    [
        ("nf4", torch.bfloat16, torch.uint8),
        ("fp4-dq", torch.float32, torch.uint8),
        ("int8", torch.float16, torch.int8),  # Lightning's int8 modes want float16
    ],
)
def test_every_frozen_bitsandbytes_precision_mode_trains(
    lift_cuda_only_check, tmp_path, mode, dtype, stored
):
    from lightning.pytorch.plugins import BitsandbytesPrecision

    module = CausalLM()
    config = copy.deepcopy(CONFIGS["dora"])
    trainer(tmp_path, [PEFTCallback(config)], 3, plugins=BitsandbytesPrecision(mode, dtype)).fit(
        module
    )
    layer = module.model.model.layers[1].self_attn.v_proj
    assert isinstance(layer, QuantizedLoRALinear) and layer.weight.dtype == stored
    assert layer.lora_magnitude.dtype == torch.float32 and layer.lora_magnitude.grad is not None
    assert all(torch.isfinite(torch.tensor(module.losses)))


def test_int8_training_mode_is_refused_by_name(lift_cuda_only_check, tmp_path):
    from lightning.pytorch.plugins import BitsandbytesPrecision

    plugin = BitsandbytesPrecision("int8-training", torch.float16)
    with pytest.raises(ValueError, match=r"with has_fp16_weights=True .* 'int8-training'"):
        trainer(tmp_path, [PEFTCallback(copy.deepcopy(CONFIGS["lora"]))], plugins=plugin).fit(
            CausalLM()
        )


@pytest.mark.cuda
def test_cuda_bitsandbytes_precision_trains_qdora(tmp_path):
    """Lightning's own route, where Lightning allows it: nf4-dq in bfloat16 on the GPU."""
    from lightning.pytorch.plugins import BitsandbytesPrecision

    module = CausalLM()
    snapshot = Snapshot()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    plugin = BitsandbytesPrecision("nf4-dq", dtype=torch.bfloat16)
    callbacks = [PEFTCallback(copy.deepcopy(CONFIGS["dora"])), snapshot, ckpt]
    trainer(tmp_path, callbacks, accelerator="gpu", devices=1, plugins=plugin).fit(module)
    check_only_adapters_changed(module, snapshot, ckpt.last_model_path)
    layer = module.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantizedLoRALinear) and layer.weight.device.type == "cuda"
    assert layer.weight.dtype == torch.uint8 and layer.lora_A.dtype == torch.float32


def test_bitsandbytes_precision_resume_is_exact(lift_cuda_only_check, tmp_path):
    check_resume(tmp_path, CausalLM, CONFIGS["dora"], nf4_dq)


class BuiltInInit(CausalLM):
    """No ``configure_model`` hook: Lightning refuses ``BitsandbytesPrecision(ignore_modules=...)``
    around one ("Instantiating your model under the init_module context ... is not supported")."""

    configure_model = pl.LightningModule.configure_model


def test_bitsandbytes_precision_adapter_loads_in_peft_over_transformers_4bit(
    lift_cuda_only_check, tmp_path
):
    """Lightning's nf4-dq and transformers' nf4 with double quantization store the same bits:
    the adapter trained under the plugin gives the same logits in peft over transformers' base."""
    peft = pytest.importorskip("peft")
    module = BuiltInInit()
    module.model.save_pretrained(tmp_path / "float")
    out = tmp_path / "adapter"
    callback = PEFTCallback(copy.deepcopy(CONFIGS["dora"]), save_adapter_to=out)
    trainer(tmp_path, [callback], plugins=nf4_dq(ignore_modules={"model.lm_head"})).fit(module)
    theirs = peft.PeftModel.from_pretrained(
        no_cpu_packing(load_quantized(tmp_path / "float", "nf4")), out
    )
    ids = random_tokens(4)
    with torch.no_grad():
        ours = module.model.eval()(input_ids=ids).logits
        diff = (ours - theirs.eval()(input_ids=ids).logits).abs().max().item()
    print(f"BitsandbytesPrecision adapter in peft over transformers' nf4: max |Δ| = {diff:.1e}")
    assert diff < 1e-6


def test_modules_to_save_stay_float_under_bitsandbytes_precision(lift_cuda_only_check, tmp_path):
    module = BuiltInInit()
    config = LoRAConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    trainer(tmp_path, [PEFTCallback(config)], max_steps=2, plugins=nf4_dq()).fit(module)
    head = module.model.lm_head
    assert type(head) is torch.nn.Linear and head.weight.requires_grad
    assert bitsandbytes_kind(module.model.model.layers[0].mlp.up_proj) == "4bit"


def test_a_plugin_that_quantizes_nothing_is_refused(lift_cuda_only_check, tmp_path):
    module = BuiltInInit()
    with pytest.raises(ValueError, match="BitsandbytesPrecision would quantize no layer"):
        trainer(
            tmp_path,
            [PEFTCallback(copy.deepcopy(CONFIGS["lora"]))],
            plugins=nf4_dq(ignore_modules={"model"}),
        ).fit(module)
    assert type(module.model.model.layers[0].self_attn.q_proj) is torch.nn.Linear


# -- a model loaded 4-bit by transformers -------------------------------------------------------


class QuantizedCausalLM(CausalLM):
    """``CausalLM`` whose model transformers loads 4-bit (nf4, double quantization)."""

    def __init__(self, model_dir, **kwargs):
        super().__init__(build_in_configure_model=True, **kwargs)
        self.model_dir = model_dir

    def configure_model(self) -> None:
        if self.model is None:
            self.model = load_quantized(self.model_dir, "nf4")


@pytest.fixture
def model_dir(tmp_path):
    from tests.helpers.lightning_modules import tiny_llama64

    tiny_llama64().save_pretrained(tmp_path / "float")
    return tmp_path / "float"


def test_transformers_4bit_model_trains_only_adapters(model_dir, tmp_path):
    module = QuantizedCausalLM(model_dir)
    snapshot = Snapshot()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    out = tmp_path / "adapter"
    callbacks = [PEFTCallback(copy.deepcopy(CONFIGS["dora"]), save_adapter_to=out), snapshot, ckpt]
    trainer(tmp_path, callbacks).fit(module)
    check_only_adapters_changed(module, snapshot, ckpt.last_model_path)
    layers = [layer for _, layer in adapter_layers(module)]
    assert len(layers) == 4 and all(isinstance(layer, QuantizedLoRALinear) for layer in layers)
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(no_cpu_packing(load_quantized(model_dir, "nf4")), out)
    ids = random_tokens(4)
    with torch.no_grad():
        ours = module.model.eval()(input_ids=ids).logits
        torch.testing.assert_close(ours, theirs.eval()(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_transformers_4bit_model_resume_is_exact(model_dir, tmp_path):
    check_resume(tmp_path, lambda: QuantizedCausalLM(model_dir), CONFIGS["lora"])
