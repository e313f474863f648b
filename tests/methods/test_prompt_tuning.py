"""Prompt tuning against the real ``peft`` (outputs, losses, gradients, inits, both save/load
directions) on tiny Llama, GPT-2 and BERT models; ``generate``; and every call it refuses."""

import copy
import json

import pytest
import torch
from torch import nn

from lightning_peft import (
    PromptEmbedding,
    PromptTuningConfig,
    adapter_state_dict,
    disable_adapters,
    inject_adapters,
    load_adapter,
    merge_adapters,
    read_config,
    save_adapter,
    trainable_parameters,
    unload,
)
from tests.helpers.tiny_models import MODELS, assert_unchanged, snapshot, tokens

peft = pytest.importorskip("peft")

TASKS = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS"}


def tokenizer_dir(path, words: int = 62):
    """A word-level tokenizer saved in ``path``: ``[UNK]`` 0, ``[BOS]`` 1, ``w<i>`` i + 2."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "[BOS]", *(f"w{i}" for i in range(words))])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", bos_token="[BOS]"
    ).save_pretrained(path)
    return str(path)


def batch(family: str) -> dict:
    """input_ids with a padded row, its mask, labels as the task has them (BERT: token types)."""
    ids = tokens(batch=2, length=7)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if TASKS[family] == "CAUSAL_LM":
        inputs["labels"] = ids.masked_fill(mask == 0, -100)
    else:
        inputs["labels"] = torch.tensor([0, 2])
        inputs["token_type_ids"] = torch.zeros_like(ids)
    return inputs


def our_prompt(model) -> nn.Parameter:
    return next(m for m in model.modules() if isinstance(m, PromptEmbedding)).embedding


@pytest.mark.parametrize("family", list(MODELS))
def test_outputs_losses_and_grads_equal_peft_both_ways(family, tmp_path):
    base = MODELS[family]()
    inputs = batch(family)
    ours = copy.deepcopy(base)
    inject_adapters(ours, PromptTuningConfig(num_virtual_tokens=5, task_type=TASKS[family]))
    save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    for name, param in theirs.named_parameters():  # peft loads prompt learning frozen
        param.requires_grad_("prompt_encoder" in name or "modules_to_save" in name)
    mine, expected = ours(**inputs), theirs(**inputs)
    assert (mine.logits - expected.logits).abs().max() == 0
    assert (mine.loss - expected.loss).abs() == 0
    mine.loss.backward()
    expected.loss.backward()
    their_prompt = theirs.prompt_encoder["default"].embedding.weight
    torch.testing.assert_close(our_prompt(ours).grad, their_prompt.grad, rtol=1e-5, atol=1e-8)
    assert our_prompt(ours).grad.abs().sum() > 0
    if family == "bert":  # the task head trains in full, in both
        torch.testing.assert_close(
            ours.classifier.weight.grad,
            theirs.base_model.classifier.modules_to_save["default"].weight.grad,
        )

    # peft's own adapter loads here with equal outputs
    peft_model = peft.get_peft_model(
        copy.deepcopy(base),
        peft.PromptTuningConfig(num_virtual_tokens=4, task_type=TASKS[family]),
    )
    if family == "bert":
        with torch.no_grad():  # a head that differs from the base's, to see it saved and loaded
            peft_model.base_model.classifier.modules_to_save["default"].weight.normal_()
    peft_model.save_pretrained(tmp_path / "theirs")
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    assert (loaded(**inputs).logits - peft_model(**inputs).logits).abs().max() == 0


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_inputs_embeds_are_extended_as_peft_does(family):
    base = MODELS[family]()
    ours = copy.deepcopy(base)
    inject_adapters(ours, PromptTuningConfig(num_virtual_tokens=3, task_type=TASKS[family]))
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.PromptTuningConfig(num_virtual_tokens=3, task_type=TASKS[family])
    )
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.copy_(our_prompt(ours))
    inputs = batch(family)
    embeds = base.get_input_embeddings()(inputs.pop("input_ids"))
    assert (
        ours(inputs_embeds=embeds, **inputs).logits - theirs(inputs_embeds=embeds, **inputs).logits
    ).abs().max() == 0


def test_text_init_equals_peft_s_and_a_hub_name_is_refused(tmp_path):
    base = MODELS["llama"]()
    path = tokenizer_dir(tmp_path / "tokenizer")
    text = "w3 w7 w11"  # ids 5, 9, 13, repeated to 7 as peft repeats them
    config = PromptTuningConfig(
        num_virtual_tokens=7,
        task_type="CAUSAL_LM",
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text=text,
        tokenizer_name_or_path=path,
    )
    ours = copy.deepcopy(base)
    inject_adapters(ours, config)
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.PromptTuningConfig(
            num_virtual_tokens=7,
            task_type="CAUSAL_LM",
            prompt_tuning_init="TEXT",
            prompt_tuning_init_text=text,
            tokenizer_name_or_path=path,
        ),
    )
    expected = theirs.get_prompt_embedding_to_save("default")
    assert torch.equal(our_prompt(ours).detach(), expected)
    rows = base.get_input_embeddings().weight[[5, 9, 13, 5, 9, 13, 5]]
    assert torch.equal(our_prompt(ours).detach(), rows)

    with pytest.raises(ValueError, match="'gpt2' is not a local directory; this package never"):
        PromptTuningConfig(
            num_virtual_tokens=4,
            task_type="CAUSAL_LM",
            prompt_tuning_init="TEXT",
            prompt_tuning_init_text=text,
            tokenizer_name_or_path="gpt2",
        )
    big = tokenizer_dir(tmp_path / "big", words=100)  # ids up to 101, the model has 64 rows
    fresh = copy.deepcopy(base)
    before = snapshot(fresh)
    with pytest.raises(
        ValueError, match="gives token id 92 but the model's input embedding has 64"
    ):
        inject_adapters(
            fresh,
            PromptTuningConfig(
                num_virtual_tokens=4,
                task_type="CAUSAL_LM",
                prompt_tuning_init="TEXT",
                prompt_tuning_init_text="w90",
                tokenizer_name_or_path=big,
            ),
        )
    assert_unchanged(fresh, before)
    with pytest.raises(ValueError, match="trust_remote_code is not allowed"):
        PromptTuningConfig(
            num_virtual_tokens=4,
            task_type="CAUSAL_LM",
            prompt_tuning_init="TEXT",
            prompt_tuning_init_text=text,
            tokenizer_name_or_path=path,
            tokenizer_kwargs={"trust_remote_code": True},
        )


def test_loading_a_text_initialised_adapter_needs_no_tokenizer(tmp_path):
    """peft writes ``inference_mode: true``: the init is skipped, the weights come from the file
    (even when the tokenizer it names is a hub name, never fetched)."""
    base = MODELS["gpt2"]()
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.PromptTuningConfig(
            num_virtual_tokens=4,
            task_type="CAUSAL_LM",
            prompt_tuning_init="TEXT",
            prompt_tuning_init_text="w1 w2",
            tokenizer_name_or_path=tokenizer_dir(tmp_path / "tok"),
        ),
    )
    theirs.save_pretrained(tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "tokenizer_name_or_path": "gpt2"}))
    ours = load_adapter(copy.deepcopy(base), tmp_path / "adapter")
    assert torch.equal(our_prompt(ours).detach(), theirs.get_prompt_embedding_to_save("default"))


def test_sample_vocab_init_takes_embedding_rows():
    base = MODELS["bert"]()
    model = copy.deepcopy(base)
    inject_adapters(
        model,
        PromptTuningConfig(
            num_virtual_tokens=6, task_type="SEQ_CLS", prompt_tuning_init="SAMPLE_VOCAB"
        ),
    )
    table = base.get_input_embeddings().weight
    for row in our_prompt(model).detach():
        assert (table == row).all(dim=1).any()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_equals_greedy_decoding_without_a_cache(family):
    """``generate`` (a cache, position ids made from the mask, a left-padded row) gives the tokens
    of a plain greedy loop that runs the whole sequence through the adapted model each step."""
    model = MODELS[family]()
    inject_adapters(model, PromptTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM"))
    with torch.no_grad():
        our_prompt(model).mul_(3)  # a prompt that changes what is generated
    ids = tokens(batch=2, length=6)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    with torch.no_grad():
        generated = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0
        )
        current, current_mask = ids, mask
        for _ in range(6):
            positions = (current_mask.cumsum(-1) - 1).clamp(min=0)  # generate's rule
            logits = model(
                input_ids=current,
                attention_mask=current_mask,
                position_ids=positions,
                use_cache=False,
            ).logits
            current = torch.cat([current, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            current_mask = torch.cat([current_mask, torch.ones_like(current_mask[:, :1])], dim=1)
        with disable_adapters(model):
            plain = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=6,
                do_sample=False,
                pad_token_id=0,
            )
    assert torch.equal(generated, current)
    assert not torch.equal(generated, plain)  # the prompt changed the continuation


def test_default_position_ids_equal_no_position_ids():
    model = MODELS["llama"]()
    inject_adapters(model, PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    ids = tokens()
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    torch.testing.assert_close(
        model(input_ids=ids, position_ids=positions).logits, model(input_ids=ids).logits
    )


def test_positional_arguments_are_named_by_the_signature():
    model = MODELS["gpt2"]()
    inject_adapters(model, PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"))
    ids = tokens()
    assert torch.equal(model(ids).logits, model(input_ids=ids).logits)


class StarArgs(nn.Module):
    """A wrapper whose forward names nothing: its positional tensors cannot be identified."""

    def __init__(self):
        super().__init__()
        self.inner = MODELS["llama"]()

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, *args, inputs_embeds=None, **kwargs):
        return self.inner(*args, inputs_embeds=inputs_embeds, **kwargs)


def test_calls_it_cannot_extend_are_refused_by_name():
    model = MODELS["llama"]()
    inject_adapters(model, PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"))
    ids = tokens()
    with pytest.raises(ValueError, match="LlamaModel was called directly, which would skip them"):
        model.model(input_ids=ids)
    with pytest.raises(ValueError, match=r"extends per-token labels \(batch, length\)"):
        model(input_ids=ids, labels=ids[:, 0])
    with pytest.raises(ValueError, match=r"extends a 2-D attention_mask .* got \(2, 1, 7, 7\)"):
        model(input_ids=ids, attention_mask=torch.ones(2, 1, 7, 7))
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model(input_ids=ids, inputs_embeds=model.get_input_embeddings()(ids))
    gpt2 = MODELS["gpt2"]()
    inject_adapters(gpt2, PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match=r"\(CAUSAL_LM\) cannot extend token_type_ids"):
        gpt2(input_ids=ids, token_type_ids=torch.zeros_like(ids))
    wrapper = StarArgs()
    inject_adapters(wrapper, PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match="cannot tell what 1 positional argument"):
        wrapper(ids)
    assert wrapper(input_ids=ids).logits.shape == (2, 9, 64)  # by name it works


def test_models_it_cannot_adapt_are_refused_before_anything_changes():
    net = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    before = snapshot(net)
    with pytest.raises(
        ValueError, match="Sequential has no input embedding: adapt the transformers"
    ):
        inject_adapters(net, PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"))
    assert_unchanged(net, before)
    with pytest.raises(ValueError, match=r"'model\.embed_tokens' is inside modules_to_save"):
        inject_adapters(
            MODELS["llama"](),
            PromptTuningConfig(
                num_virtual_tokens=2, task_type="CAUSAL_LM", modules_to_save=["embed_tokens"]
            ),
        )
    with pytest.raises(ValueError, match="token_dim=16 but the input embedding"):
        inject_adapters(
            MODELS["llama"](),
            PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM", token_dim=16),
        )


def test_config_refusals():
    with pytest.raises(ValueError, match="num_virtual_tokens must be an integer >= 1"):
        PromptTuningConfig(task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match="task_type must be one of"):
        PromptTuningConfig(num_virtual_tokens=2)
    with pytest.raises(ValueError, match="encoder-decoder"):
        PromptTuningConfig(num_virtual_tokens=2, task_type="SEQ_2_SEQ_LM")
    with pytest.raises(ValueError, match="num_transformer_submodules=2"):
        PromptTuningConfig(
            num_virtual_tokens=2, task_type="CAUSAL_LM", num_transformer_submodules=2
        )
    with pytest.raises(ValueError, match="prompt_tuning_init must be one of"):
        PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM", prompt_tuning_init="ZEROS")
    their_dict = peft.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM").to_dict()
    assert PromptTuningConfig(**their_dict) == PromptTuningConfig(
        num_virtual_tokens=3, task_type="CAUSAL_LM"
    )


def test_trainable_set_file_and_unload(tmp_path):
    base = MODELS["bert"]()
    model = copy.deepcopy(base)
    report = inject_adapters(model, PromptTuningConfig(num_virtual_tokens=3, task_type="SEQ_CLS"))
    assert set(trainable_parameters(model)) == {
        "bert.embeddings.word_embeddings.prompt_tuning.embedding",
        "classifier.weight",
        "classifier.bias",
    }
    assert set(adapter_state_dict(model)) == set(trainable_parameters(model))
    assert report.trainable_params == 3 * 32 + 3 * 32 + 3
    save_adapter(model, tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in saved.items()} == {
        "prompt_embeddings": (3, 32),
        "base_model.classifier.weight": (3, 32),
        "base_model.classifier.bias": (3,),
    }
    config = read_config(tmp_path)
    assert config == PromptTuningConfig(
        num_virtual_tokens=3, task_type="SEQ_CLS", token_dim=32, num_transformer_submodules=1
    )
    assert config.inference_mode  # a loaded adapter skips the init, as in peft

    with pytest.raises(ValueError, match=r"\(prompt tuning\) cannot be merged into weights"):
        merge_adapters(model)
    with pytest.raises(ValueError, match="unload\\(model, merge=False\\)"):
        unload(model)
    copied = copy.deepcopy(model)  # the hooks survive a copy
    inputs = batch("bert")
    torch.testing.assert_close(copied(**inputs).logits, model(**inputs).logits)
    unload(model, merge=False)
    assert not model._forward_pre_hooks and not model.bert._forward_pre_hooks
    assert model.state_dict().keys() == base.state_dict().keys()
    assert model(**inputs).logits.shape == (2, 3)
    base_out = base(**inputs).logits
    torch.testing.assert_close(model(**inputs).logits, base_out)


def test_task_less_peft_file_is_refused(tmp_path):
    """peft's task-less ``PeftModel`` never prepends the prompt: no equal load is possible."""
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4, "task_type": None})
    )
    with pytest.raises(ValueError, match="task_type must be one of"):
        read_config(tmp_path)
