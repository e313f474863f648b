"""The LLM training stack around the adapters, on a tiny Llama built from a config (and, marked
slow, on the real SmolLM2-135M-Instruct): gradient checkpointing, generation with the KV cache,
merge + ``save_pretrained`` to a plain transformers model, tied embeddings, bf16 precisions in a
Lightning ``Trainer``, and ``torch.compile`` of the whole adapted model."""

import copy

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_peft import (
    LoRAConfig,
    PEFTCallback,
    adapter_state_dict,
    inject_adapters,
    merge_adapters,
    unload,
)
from tests.helpers.lightning_modules import quiet_trainer
from tests.helpers.tiny_models import tiny_llama

ALL_LINEAR = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}


def llama(seed: int = 0, tied: bool = False):
    """``tiny_llama`` with vocabulary 96 and special tokens 0-2, in train mode."""
    return tiny_llama(
        seed,
        vocab_size=96,
        tie_word_embeddings=tied,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    ).train()


def adapted(use_dora: bool = False, seed: int = 0, tied: bool = False):
    """The tiny Llama with LoRA/DoRA on every linear layer; B random, so the adapters act."""
    model = llama(seed, tied)
    inject_adapters(model, LoRAConfig(**ALL_LINEAR, use_dora=use_dora, init_lora_weights=False))
    with torch.no_grad():  # smaller updates: a changed model, not a broken one
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.mul_(0.2)
    return model


def token_ids(batch: int = 2, length: int = 11, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


# -- gradient checkpointing ---------------------------------------------------------------------


def adapter_grads(checkpointing: dict | None, input_grads: bool = True) -> dict:
    model = adapted().train()
    if checkpointing is not None:
        enable = getattr(model, "activation_checkpointing_enable", None)
        (enable or model.gradient_checkpointing_enable)(checkpointing)
        if not input_grads:
            model.disable_input_require_grads()
    ids = token_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_gives_the_same_adapter_gradients(reentrant):
    """With the base frozen, the adapters inside each checkpointed block get exactly the
    gradients they get without checkpointing. Non-reentrant checkpointing (what FineTuneTask
    uses) needs nothing more; reentrant needs the embeddings' output to require grad
    (``enable_input_require_grads``, which transformers >= 5 adds itself)."""
    reference = adapter_grads(None)
    assert len(reference) == 2 * 7 * 2 and all(g is not None for g in reference.values())
    got = adapter_grads({"use_reentrant": reentrant}, input_grads=True)
    for name, grad in reference.items():
        torch.testing.assert_close(got[name], grad, rtol=0, atol=0, msg=name)
    if reentrant:  # nothing requires grad between the blocks: backward has nothing to do
        with pytest.raises(RuntimeError, match="does not require grad"):
            adapter_grads({"use_reentrant": True}, input_grads=False)
    else:
        without = adapter_grads({"use_reentrant": False}, input_grads=False)
        for name, grad in reference.items():
            torch.testing.assert_close(without[name], grad, rtol=0, atol=0, msg=name)


# -- generation, merge, export ------------------------------------------------------------------


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_generate_with_kv_cache_matches_the_merged_model(use_dora):
    model = adapted(use_dora).eval()
    prompt = token_ids(batch=1, length=5)
    kwargs = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 2, "eos_token_id": None}
    cached = model.generate(prompt, use_cache=True, **kwargs)
    uncached = model.generate(prompt, use_cache=False, **kwargs)
    base = llama().eval().generate(prompt, use_cache=True, **kwargs)
    merge_adapters(model)
    merged = model.generate(prompt, use_cache=True, **kwargs)
    assert cached.shape == (1, 17)
    assert torch.equal(cached, uncached) and torch.equal(cached, merged)
    assert not torch.equal(cached, base)  # the adapters change what the model says


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_unload_merge_then_save_pretrained_is_a_plain_transformers_model(tmp_path, use_dora):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model = adapted(use_dora).eval()
    ids = token_ids()
    expected = model(input_ids=ids).logits
    plain = unload(model, merge=True)
    plain.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    assert keys == set(llama().state_dict()) and not any("lora" in k for k in keys)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert type(loaded).__module__.startswith("transformers.")
    torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


# -- Lightning: tied embeddings and precisions --------------------------------------------------


class TiedLlamaLM(pl.LightningModule):
    """Next-token loss on a tied tiny Llama; knows nothing of adapters."""

    def __init__(self):
        super().__init__()
        self.model = llama(tied=True)
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch, labels=batch).loss
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)

    def train_dataloader(self):
        return DataLoader(token_ids(batch=16, length=12, seed=3), batch_size=4)


@pytest.mark.parametrize("precision", ["32-true", "bf16-true", "bf16-mixed"])
def test_trainer_keeps_tied_embeddings_tied_and_untouched(tmp_path, precision):
    module = TiedLlamaLM()
    embedding = module.model.model.embed_tokens.weight
    assert module.model.lm_head.weight is embedding
    frozen = {k: v.clone() for k, v in module.model.state_dict().items()}
    callback = PEFTCallback(LoRAConfig(**ALL_LINEAR), verbose=False)
    quiet_trainer(tmp_path, [callback], max_steps=4, precision=precision).fit(module)
    model = module.model
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still one tensor
    assert not any("lm_head" in m.name for m in callback.report.modules)  # not adapted
    assert len(callback.report.modules) == 14
    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert model.model.embed_tokens.weight.dtype == dtype
    torch.testing.assert_close(
        model.model.embed_tokens.weight,
        frozen["model.embed_tokens.weight"].to(dtype),
        rtol=0,
        atol=0,
    )
    adapters = adapter_state_dict(module)
    for name, value in module.model.state_dict().items():
        if f"model.{name}" not in adapters:
            torch.testing.assert_close(value, frozen[name].to(value.dtype), rtol=0, atol=0)
    assert all(t.dtype == torch.float32 for t in adapters.values())
    assert any(k.endswith("lora_B") and t.abs().sum() > 0 for k, t in adapters.items())  # learnt
    assert all(torch.isfinite(torch.tensor(module.losses)))


# -- torch.compile ------------------------------------------------------------------------------


def breaks_in_our_code(explanation) -> list[str]:
    """The graph-break reasons whose user stack passes through this project's code."""
    ours = []
    for reason in explanation.break_reasons:
        files = [frame.filename for frame in reason.user_stack]
        if any("/lightning_peft/" in f or "/peft_kernels/" in f for f in files):
            ours.append(reason.reason.splitlines()[0])
    return ours


@pytest.mark.slow
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_compile_whole_adapted_model_without_graph_breaks_from_our_ops(use_dora):
    """``torch.compile`` of the adapted Llama, forward and backward: the ops trace as custom ops,
    no graph break comes from this project (counted with ``torch._dynamo.explain``), and the
    compiled gradients equal eager ones."""
    torch._dynamo.reset()
    model = adapted(use_dora).train()
    model.config.use_cache = False
    ids = token_ids()
    explanation = torch._dynamo.explain(model)(input_ids=ids, labels=ids)
    print(
        f"{'DoRA' if use_dora else 'LoRA'}: {explanation.graph_count} graph(s), "
        f"{explanation.graph_break_count} break(s), ours: {len(breaks_in_our_code(explanation))}"
    )
    assert breaks_in_our_code(explanation) == []
    assert explanation.graph_break_count == 0  # nothing else breaks on this model either

    torch._dynamo.reset()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager")
    for run in (eager, compiled):
        run(input_ids=ids, labels=ids).loss.backward()
    for (name, param), twin in zip(model.named_parameters(), eager.parameters(), strict=True):
        if param.requires_grad:
            torch.testing.assert_close(param.grad, twin.grad, rtol=1e-5, atol=1e-6, msg=name)


# -- the real model -----------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_adapted_generation_matches_merged_and_embeddings_stay_tied():
    """On SmolLM2-135M-Instruct: LoRA on all 210 linear layers (lm_head left out, tied), greedy
    generation with the KV cache before merging equals generation after."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_peft.cli.embedded import smollm2_path

    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    report = inject_adapters(model, LoRAConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    assert len(report.modules) == 210 and model.lm_head.weight is model.model.embed_tokens.weight
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(0, 2e-3)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    kwargs = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    unmerged = model.generate(ids, use_cache=True, **kwargs)
    merge_adapters(model)
    assert torch.equal(model.generate(ids, use_cache=True, **kwargs), unmerged)
