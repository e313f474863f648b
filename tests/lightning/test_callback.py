"""PEFTCallback on one CPU: injection, training, adapter-only checkpoints, resume, end hooks."""

import copy

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger

from lightning_peft import (
    AdapterConfig,
    LoRAConfig,
    LoRALinear,
    PEFTCallback,
    adapter_state_dict,
    lora_plus_param_groups,
)
from tests.helpers.lightning_modules import (
    CaptureOnTrainEnd,
    CaptureOnTrainStart,
    CausalLM,
    assert_resumed_exactly,
    random_tokens,
    trainer,
)

CONFIGS = {
    "lora": LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "dora": LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True),
    "adapter": AdapterConfig(bottleneck_dim=8, target_modules=["mlp"]),
}


def _loss(module, data: torch.Tensor) -> float:
    """The next-token loss of ``module``'s model on ``data``, in eval mode (no dropout)."""
    training = module.training
    module.eval()
    with torch.no_grad():
        loss = module.model(input_ids=data, labels=data).loss.item()
    module.train(training)
    return loss


@pytest.mark.parametrize("method", list(CONFIGS))
def test_trains_only_adapters_and_checkpoints_are_small(tmp_path, method):
    module = CausalLM()
    base = {k: v.clone() for k, v in module.state_dict().items()}
    data = random_tokens()  # the whole training set (8 batches, unshuffled)
    before = _loss(module, data)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(tmp_path, [PEFTCallback(copy.deepcopy(CONFIGS[method])), ckpt], max_steps=24).fit(
        module
    )
    epochs = [sum(module.losses[i : i + 8]) for i in (0, 8, 16)]  # 8 batches an epoch
    assert epochs[0] > epochs[1] > epochs[2], epochs  # every epoch lowers the training loss
    # the adapters alone lower the loss on the training set, measured outside training
    assert _loss(module, data) < 0.99 * before
    adapters = adapter_state_dict(module)
    for key, value in module.state_dict().items():
        if key in base and key not in adapters:
            assert torch.equal(value, base[key]), key  # frozen: bit-identical
    saved = torch.load(ckpt.last_model_path, weights_only=False)
    assert set(saved["state_dict"]) == set(adapters)
    full = tmp_path / "full.pt"
    torch.save(base, full)
    ratio = (tmp_path / "last.ckpt").stat().st_size / full.stat().st_size
    print(f"checkpoint size ratio ({method}): {ratio:.3f}")
    assert ratio < 0.15, ratio


@pytest.mark.parametrize("method", list(CONFIGS))
def test_resume_restores_adapters_and_optimizer_exactly(tmp_path, method):
    first_end = CaptureOnTrainEnd()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=4)
    first = trainer(
        tmp_path, [PEFTCallback(copy.deepcopy(CONFIGS[method])), ckpt, first_end], max_steps=4
    )
    first.fit(CausalLM())
    # A new process would rebuild the same base model; its fresh adapters must be overwritten.
    torch.manual_seed(123)
    resumed_start = CaptureOnTrainStart()
    second = trainer(
        tmp_path, [PEFTCallback(copy.deepcopy(CONFIGS[method])), resumed_start], max_steps=6
    )
    second.fit(CausalLM(), ckpt_path=ckpt.last_model_path)
    assert resumed_start.step == 4
    assert_resumed_exactly(resumed_start, first_end)


def test_model_built_in_configure_model_and_no_double_injection(tmp_path):
    module = CausalLM(build_in_configure_model=True)
    callback = PEFTCallback(copy.deepcopy(CONFIGS["lora"]))
    run = trainer(tmp_path, [callback], max_steps=2)
    run.fit(module)
    layers = [m for m in module.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 4
    run.fit(module)  # a second fit runs setup again: nothing is injected twice
    assert len([m for m in module.modules() if isinstance(m, LoRALinear)]) == 4


def test_save_adapter_to_writes_a_directory_peft_loads(tmp_path):
    peft = pytest.importorskip("peft")
    module = CausalLM()
    base = copy.deepcopy(module.model)
    out = tmp_path / "adapter"
    trainer(
        tmp_path, [PEFTCallback(copy.deepcopy(CONFIGS["dora"]), save_adapter_to=out)], max_steps=3
    ).fit(module)
    theirs = peft.PeftModel.from_pretrained(base.eval(), out)
    ids = random_tokens(4)
    module.eval()
    torch.testing.assert_close(
        theirs(input_ids=ids).logits, module.model(input_ids=ids).logits, rtol=1e-4, atol=1e-5
    )


def test_merge_on_train_end(tmp_path):
    module = CausalLM()
    trainer(
        tmp_path,
        [PEFTCallback(copy.deepcopy(CONFIGS["lora"]), merge_on_train_end=True)],
        max_steps=3,
    ).fit(module)
    layers = [m for m in module.modules() if isinstance(m, LoRALinear)]
    assert layers and all(layer.merged for layer in layers)
    ids = random_tokens(4)
    module.eval()
    merged = module.model(input_ids=ids).logits
    for layer in layers:
        layer.unmerge()
    torch.testing.assert_close(module.model(input_ids=ids).logits, merged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_mixed_precision_keeps_adapters_in_float32(tmp_path, precision):
    module = CausalLM()
    trainer(
        tmp_path, [PEFTCallback(copy.deepcopy(CONFIGS["dora"]))], max_steps=3, precision=precision
    ).fit(module)
    adapters = adapter_state_dict(module)
    assert adapters and all(t.dtype == torch.float32 for t in adapters.values())
    if precision == "bf16-true":
        assert module.model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert all(torch.isfinite(torch.tensor(module.losses)))


class MetricsLogger(Logger):
    name, version, experiment = "capture", 0, None

    def __init__(self):
        super().__init__()
        self.metrics = {}

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)

    def log_hyperparams(self, *args, **kwargs):
        pass


def test_logs_the_trainable_fraction(tmp_path, caplog):
    logger = MetricsLogger()
    module = CausalLM()
    trainer(
        tmp_path, [PEFTCallback(copy.deepcopy(CONFIGS["lora"]))], max_steps=1, logger=logger
    ).fit(module)
    fraction = logger.metrics["peft/trainable_fraction"]
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert fraction == pytest.approx(trainable / sum(p.numel() for p in module.parameters()))
    assert "model.layers.1.self_attn.v_proj" in caplog.text


def test_lora_plus_groups():
    module = CausalLM()
    from lightning_peft import inject_adapters

    inject_adapters(module.model, CONFIGS["lora"])
    slow, fast = lora_plus_param_groups(module, lr=1e-3, ratio=16)
    assert fast["lr"] == pytest.approx(1.6e-2) and slow["lr"] == 1e-3
    assert len(fast["params"]) == 4 and len(slow["params"]) == 4
    assert all(p.shape[1] == 4 for p in fast["params"])  # the B matrices (out, r)


def test_bad_config_and_unsupported_merge():
    with pytest.raises(TypeError, match="LoRAConfig or AdapterConfig"):
        PEFTCallback({"r": 4})
    with pytest.raises(ValueError, match="cannot be merged"):
        PEFTCallback(CONFIGS["adapter"], merge_on_train_end=True)
