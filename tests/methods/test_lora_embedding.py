"""LoRA and DoRA on nn.Embedding: ``peft_kernels.lora_embedding`` / ``dora_embedding`` against a
float64 one-hot reference (the test's, never the op's), what the forward keeps for backward,
and ``LoRAEmbedding`` against the real peft, both save/load directions."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft import LoRAConfig, inject_adapters, merge_adapters, unmerge_adapters
from lightning_peft.methods.lora.embedding import LoRAEmbedding
from peft_kernels import dora_embedding, embedding_dora_weight_norm, lora_embedding
from tests.helpers.peft_interop import check_against_peft
from tests.helpers.tiny_models import tiny_gpt2, tokens

f64 = {"dtype": torch.float64}


def factors(vocab, dim, rank, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(vocab, dim, generator=gen, **f64),
        torch.randn(rank, vocab, generator=gen, **f64),
        torch.randn(dim, rank, generator=gen, **f64),
    )


def one_hot_reference(ids, weight, lora_A, lora_B, s, magnitude=None):
    """``onehot(ids) @ (W + s·Aᵀ Bᵀ)``, DoRA-scaled per column with the norm detached."""
    merged = weight + s * lora_A.T @ lora_B.T
    y = F.one_hot(ids, weight.shape[0]).to(weight.dtype) @ merged
    if magnitude is None:
        return y
    return magnitude / merged.norm(dim=0).detach() * y


IDS = torch.tensor([[[3, 0, 7], [7, 7, 1]], [[2, 8, 0], [5, 3, 3]]])  # 3-D, repeats, padding 0


@pytest.mark.parametrize("rank", [1, 4])
@pytest.mark.parametrize("dora", [False, True])
def test_outputs_and_grads_equal_the_one_hot_reference(rank, dora):
    weight, lora_A, lora_B = factors(9, 5, rank)
    magnitude = torch.rand(5, **f64) + 0.5
    leaves = [t.clone().requires_grad_(True) for t in (lora_A, lora_B, magnitude)]
    refs = [t.clone().requires_grad_(True) for t in (lora_A, lora_B, magnitude)]
    if dora:
        got = dora_embedding(IDS, weight, *leaves, 0.7)
        ref = one_hot_reference(IDS, weight, *refs[:2], 0.7, magnitude=refs[2])
    else:
        got = lora_embedding(IDS, weight, *leaves[:2], 0.7)
        ref = one_hot_reference(IDS, weight, *refs[:2], 0.7)
    assert got.shape == (*IDS.shape, 5)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn_like(got)
    got.backward(grad_out)
    ref.backward(grad_out)
    for mine, theirs in zip(leaves[: 3 if dora else 2], refs, strict=False):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-12, atol=1e-12)


def test_padding_index_and_frequency_scaling_act_on_a_like_on_an_embedding_weight():
    weight, lora_A, lora_B = factors(9, 5, 3)
    lora_A.requires_grad_(True)
    lora_embedding(IDS, weight, lora_A, lora_B, 1.0, padding_idx=0).sum().backward()
    assert lora_A.grad[:, 0].abs().max() == 0 and lora_A.grad[:, 7].abs().max() > 0
    assert lora_A.grad[:, 4].abs().max() == 0  # id 4 does not occur
    grads = {}
    for by_freq in (False, True):
        a = lora_A.detach().clone().requires_grad_(True)
        lora_embedding(IDS, weight, a, lora_B, 1.0, scale_grad_by_freq=by_freq).sum().backward()
        grads[by_freq] = a.grad
    torch.testing.assert_close(grads[True][:, 7], grads[False][:, 7] / 3)  # id 7 occurs 3 times


def test_dora_norm_is_over_the_vocabulary_per_embedding_dimension():
    weight, lora_A, lora_B = factors(11, 4, 2)
    ref = (weight + 0.3 * lora_A.T @ lora_B.T).norm(dim=0)
    torch.testing.assert_close(
        embedding_dora_weight_norm(weight, lora_A, lora_B, 0.3), ref, rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("dora", [False, True])
def test_forward_keeps_nothing_vocabulary_sized_for_backward(dora):
    """A gather, not a one-hot product: no (..., V) tensor and nothing of V×d is saved."""
    vocab, dim, rank = 5000, 16, 4
    weight = torch.randn(vocab, dim)
    lora_A = torch.randn(rank, vocab, requires_grad=True)
    lora_B = torch.randn(dim, rank, requires_grad=True)
    magnitude = torch.rand(dim, requires_grad=True)
    ids = torch.randint(0, vocab, (2, 7))
    saved = []

    def keep(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        if dora:
            y = dora_embedding(ids, weight, lora_A, lora_B, magnitude, 0.5)
        else:
            y = lora_embedding(ids, weight, lora_A, lora_B, 0.5)
    y.sum().backward()
    assert saved
    for shape in saved:
        numel = torch.Size(shape).numel()
        assert vocab not in shape[:-1] and numel <= vocab * rank, shape  # at most A itself


def test_bad_inputs_are_named():
    weight, lora_A, lora_B = (t.float() for t in factors(9, 5, 2))
    ids = torch.tensor([1, 2])
    with pytest.raises(TypeError, match="ids must be an int64 or int32 tensor"):
        lora_embedding(ids.float(), weight, lora_A, lora_B, 1.0)
    with pytest.raises(ValueError, match=r"lora_A must be \(r, V\)"):
        lora_embedding(ids, weight, lora_A[:, :4], lora_B, 1.0)
    with pytest.raises(ValueError, match=r"lora_B must be \(d, r\)"):
        lora_embedding(ids, weight, lora_A, lora_B.T, 1.0)
    with pytest.raises(TypeError, match="share one floating dtype"):
        lora_embedding(ids, weight, lora_A, lora_B.double(), 1.0)
    with pytest.raises(ValueError, match="requires grad"):
        lora_embedding(ids, weight.requires_grad_(True), lora_A, lora_B, 1.0)


# -- the layer, against peft --------------------------------------------------------------------


class ScaledEmbedding(nn.Embedding):
    """transformers' ``*ScaledWordEmbedding``: the lookup times a scalar buffer."""

    def __init__(self, *args, embed_scale: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("embed_scale", torch.tensor(embed_scale), persistent=False)

    def forward(self, ids):
        return super().forward(ids) * self.embed_scale.to(self.weight.dtype)


class OneEmbedding(nn.Module):
    def __init__(self, emb: nn.Module):
        super().__init__()
        self.emb = emb
        self.head = nn.Linear(emb.embedding_dim, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


LAYERS = {
    "plain": lambda: nn.Embedding(37, 6),
    "padding_idx": lambda: nn.Embedding(37, 6, padding_idx=0),
    "scale_grad_by_freq": lambda: nn.Embedding(37, 6, scale_grad_by_freq=True),
    "scaled": lambda: ScaledEmbedding(37, 6, embed_scale=2.5),
}
VARIANTS = {
    "lora": {},
    "dora": {"use_dora": True},
    "rslora-r1": {"r": 1, "use_rslora": True, "lora_alpha": 3},
    "dropout-train": {"lora_dropout": 0.5},  # peft applies no dropout to embeddings; nor here
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("layer", list(LAYERS))
def test_embedding_layer_matches_peft_both_ways(layer, variant, tmp_path):
    def make_base():
        torch.manual_seed(0)
        return OneEmbedding(LAYERS[layer]())

    ids = torch.tensor([[0, 5, 5, 36], [2, 0, 9, 5]])
    kwargs = {"r": 3, "target_modules": ["emb"], **VARIANTS[variant]}
    result = check_against_peft(make_base, ids, kwargs, tmp_path, train="train" in variant)
    print(f"\n{layer} {variant}: {result}")


class Logits(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids).logits


@pytest.mark.parametrize("dora", [False, True])
def test_gpt2_token_and_position_embeddings_match_peft(dora, tmp_path):
    """Real embeddings; wte is tied to the output layer, which keeps the base weight."""
    kwargs = {"r": 4, "target_modules": ["wte", "wpe", "c_attn"], "use_dora": dora}
    result = check_against_peft(
        lambda: Logits(tiny_gpt2()), tokens(), kwargs, tmp_path, merge=False
    )
    print(f"\ngpt2 dora={dora}: {result}")


def test_merging_into_a_tied_weight_is_refused():
    """Merging the adapter of wte into its weight would change the tied lm_head too (peft
    merges it anyway, and the merged model no longer computes what the adapted one did)."""
    model = Logits(tiny_gpt2())
    inject_adapters(model, LoRAConfig(r=2, target_modules=["wte", "c_attn"]))
    assert model.model.lm_head.weight is model.model.transformer.wte.weight
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"wte: its weight is also 'model\.lm_head\.weight'"):
        merge_adapters(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not model.model.transformer.wte.merged


def test_default_init_starts_at_the_base_as_peft_s_does():
    torch.manual_seed(0)
    base = OneEmbedding(nn.Embedding(20, 4))
    ids = torch.tensor([[1, 2, 19]])
    for init in (True, "gaussian"):
        for use_dora in (False, True):
            model = copy.deepcopy(base)
            config = LoRAConfig(
                r=2, target_modules=["emb"], init_lora_weights=init, use_dora=use_dora
            )
            inject_adapters(model, config)
            torch.testing.assert_close(model(ids), base(ids))
            assert model.emb.lora_embedding_A.abs().max() == 0  # peft: A = 0, B ~ N(0, 1)
            assert model.emb.lora_embedding_B.abs().min() > 0
    torch.testing.assert_close(model.emb.lora_magnitude, base.emb.weight.norm(dim=0))


class Positions(nn.Embedding):
    def forward(self, ids):  # its own forward, no embed_scale
        return super().forward(ids + 2)


@pytest.mark.parametrize(
    ("emb", "config", "message"),
    [
        (nn.Embedding(10, 4, max_norm=1.0), {}, "max_norm=1.0"),
        (Positions(12, 4), {}, "Positions\\) has its own forward"),
        (nn.Embedding(10, 4), {"lora_bias": True}, "lora_bias is not supported for embeddings"),
        (nn.Embedding(10, 4), {"init_lora_weights": "pissa"}, "'pissa' is not available for emb"),
        (nn.Embedding(10, 4), {"use_dora": True, "zero_column": 2}, "embedding dimension"),
    ],
    ids=["max_norm", "own-forward", "lora_bias", "pissa", "dora-zero-column"],
)
def test_refused_by_name_and_untouched(emb, config, message):
    config = dict(config)
    if config.pop("zero_column", None) is not None:
        with torch.no_grad():
            emb.weight[:, 2] = 0
    model = OneEmbedding(emb)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        inject_adapters(model, LoRAConfig(**{"r": 2, "target_modules": ["emb"], **config}))
    assert type(model.emb) is type(emb)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_sparse_embedding_trains_with_a_dense_adapter_gradient():
    """peft's sparse lookup on the transposed A fails in backward; W is frozen, so the flag has
    nothing to act on here and A gets a dense gradient any optimizer takes."""
    torch.manual_seed(0)
    model = OneEmbedding(nn.Embedding(30, 4, sparse=True))
    inject_adapters(model, LoRAConfig(r=2, target_modules=["emb"], init_lora_weights=False))
    before = model.emb.lora_embedding_A.detach().clone()
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=0.1, weight_decay=0.0)
    model(torch.tensor([[1, 4, 4]])).sum().backward()
    assert model.emb.lora_embedding_A.grad.layout == torch.strided
    optimizer.step()
    changed = (model.emb.lora_embedding_A.detach() != before).any(dim=0)
    assert changed.nonzero().flatten().tolist() == [1, 4]


def test_merge_unmerge_with_a_low_precision_weight():
    torch.manual_seed(0)
    base = OneEmbedding(nn.Embedding(25, 6))
    ids = torch.tensor([[3, 1, 24, 3]])
    for use_dora in (False, True):
        model = copy.deepcopy(base)
        inject_adapters(
            model,
            LoRAConfig(r=2, target_modules=["emb"], use_dora=use_dora, init_lora_weights=False),
        )
        with torch.no_grad():  # an update the size of W's entries, not 4·N(0, 1)·N(0, 1)
            model.emb.lora_embedding_B.mul_(0.1)
        model.emb.to(torch.bfloat16)
        assert model.emb.weight.dtype == torch.bfloat16
        assert model.emb.lora_embedding_A.dtype == torch.float32
        emb = model.emb(ids)
        assert emb.dtype == torch.bfloat16  # nn.Embedding's: the weight's dtype
        weight = model.emb.weight.detach().clone()
        merge_adapters(model)
        torch.testing.assert_close(model.emb(ids).float(), emb.float(), rtol=2e-2, atol=2e-2)
        unmerge_adapters(model)
        torch.testing.assert_close(model.emb.weight.float(), weight.float(), rtol=2e-2, atol=2e-2)
        assert isinstance(model.emb, LoRAEmbedding)
