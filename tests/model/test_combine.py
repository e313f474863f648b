"""The combination math (``lightning_peft.model.combine``) against peft 0.21.2's
``add_weighted_adapter`` on the same factors: three LoRA adapters on a tiny Llama in peft, every
combination type; ours from the very tensors peft held. Deterministic ones equal bit for bit;
dare_* with peft's masks reproduced from the RNG state at peft's first draw."""

from __future__ import annotations

import pytest
import torch

from lightning_peft.model.combine import (
    COMBINATIONS,
    ON_DELTA,
    RANDOM,
    Part,
    combine_site,
    combined_rank,
    majority_sign_mask,
    merge_tensors,
)
from tests.helpers.tiny_models import tiny_llama

peft = pytest.importorskip("peft")

WEIGHTS = [0.7, -0.4, 1.3]
# Same rank (the factor-wise combinations need it) / ranks and targets that differ.
SAME_RANK = [
    {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    {"r": 4, "lora_alpha": 3, "target_modules": ["q_proj", "v_proj"], "use_rslora": True},
    {"r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
]
MIXED = [
    {"r": 2, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    {"r": 4, "lora_alpha": 3, "target_modules": ["q_proj", "k_proj", "v_proj"]},
    {"r": 6, "lora_alpha": 16, "target_modules": ["v_proj", "o_proj"]},
]
NAMES = ["fr", "de", "it"]


def peft_model(configs: list[dict]):
    """A tiny Llama in peft with adapters fr, de, it (random A and B: init_lora_weights=False)."""
    torch.manual_seed(0)
    model = None
    for name, fields in zip(NAMES, configs, strict=True):
        config = peft.LoraConfig(init_lora_weights=False, **fields)
        if model is None:
            model = peft.get_peft_model(tiny_llama(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    return model


def lora_sites(model):
    """``[(name, layer)]`` of peft's LoRA layers, in module order (peft's combining order)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]


def parts_at(layer, names=NAMES, weights=WEIGHTS):
    present = [(k, w) for k, w in zip(names, weights, strict=True) if k in layer.lora_A]
    parts = [
        Part(layer.lora_A[k].weight.detach(), layer.lora_B[k].weight.detach(), layer.scaling[k])
        for k, _ in present
    ]
    return parts, [w for _, w in present]


class FirstDraw:
    """Wraps ``torch.bernoulli``: the global RNG state at its first call."""

    def __init__(self, monkeypatch) -> None:
        self.state = None
        original = torch.bernoulli

        def bernoulli(*args, **kwargs):
            if self.state is None:
                self.state = torch.get_rng_state()
            return original(*args, **kwargs)

        monkeypatch.setattr(torch, "bernoulli", bernoulli)
        self.undo = monkeypatch.undo


def peft_combine(model, combination, new, monkeypatch=None, **options):
    """peft's combination of fr, de, it as ``new``; the RNG state at its first mask draw."""
    draw = FirstDraw(monkeypatch) if combination in RANDOM else None
    model.add_weighted_adapter(NAMES, WEIGHTS, new, combination_type=combination, **options)
    if draw is None:
        return None
    draw.undo()
    return draw.state


def compare(model, combination, new, rank, state=None, **options):
    """Ours at every site peft combined, from peft's factors; returns the largest differences
    (factors, ΔW) and asserts equality."""
    generator = None
    if state is not None:
        generator = torch.Generator().set_state(state)
    worst, sites = 0.0, 0
    for name, layer in lora_sites(model):
        if new not in layer.lora_A:
            continue
        sites += 1
        parts, weights = parts_at(layer)
        ours_A, ours_B = combine_site(
            parts, weights, combination, rank, generator=generator, **options
        )
        theirs_A, theirs_B = layer.lora_A[new].weight, layer.lora_B[new].weight
        assert layer.scaling[new] == 1.0
        assert ours_A.shape == theirs_A.shape and ours_B.shape == theirs_B.shape, name
        assert torch.equal(ours_A, theirs_A), f"{combination} {name}: A"
        assert torch.equal(ours_B, theirs_B), f"{combination} {name}: B"
        assert theirs_B.abs().sum() > 0, f"{combination} {name}: peft's result is zero"
        worst = max(worst, float((ours_B @ ours_A - theirs_B @ theirs_A).abs().max()))
    assert sites == len(lora_sites(model)) >= 4  # the union of the parts' targets
    return worst


OPTIONS = {
    "ties": {"density": 0.5},
    "ties_svd": {"density": 0.6, "majority_sign_method": "frequency"},
    "dare_linear": {"density": 0.7},
    "dare_ties": {"density": 0.5, "majority_sign_method": "frequency"},
    "dare_linear_svd": {"density": 0.4},
    "dare_ties_svd": {"density": 0.5},
    "magnitude_prune": {"density": 0.3},
    "magnitude_prune_svd": {"density": 0.5},
}


@pytest.mark.parametrize("combination", COMBINATIONS)
def test_equal_to_peft_bit_for_bit(combination, monkeypatch):
    """Every combination type, bit for bit (dare_*: peft's masks from the RNG state at its
    first draw, given to ours as a generator)."""
    configs = MIXED if combination == "cat" or combination in ON_DELTA else SAME_RANK
    model = peft_model(configs)
    options = OPTIONS.get(combination, {})
    state = peft_combine(model, combination, "new", monkeypatch, **options)
    ranks = [c["r"] for c in configs]
    rank = combined_rank(ranks, combination)
    assert compare(model, combination, "new", rank, state, **options) == 0.0


@pytest.mark.parametrize(
    "options",
    [
        {"svd_rank": 3},
        {"svd_rank": 5, "svd_clamp": 0.9},
        {"svd_full_matrices": False},
        {"svd_clamp": 0.5, "svd_full_matrices": False},
    ],
)
def test_svd_options_equal_to_peft(options):
    model = peft_model(MIXED)
    model.add_weighted_adapter(NAMES, WEIGHTS, "new", combination_type="svd", **options)
    rank = combined_rank([2, 4, 6], "svd", options.get("svd_rank"))
    ours = {k.removeprefix("svd_"): v for k, v in options.items() if k != "svd_rank"}
    assert (
        compare(
            model,
            "svd",
            "new",
            rank,
            svd_clamp=ours.get("clamp"),
            svd_full_matrices=ours.get("full_matrices", True),
        )
        == 0.0
    )


def test_dare_from_the_global_seed(monkeypatch):
    """The other route to peft's masks: the global RNG set to the same state, generator None."""
    model = peft_model(SAME_RANK)
    state = peft_combine(model, "dare_ties", "new", monkeypatch, density=0.5)
    torch.set_rng_state(state)
    for _, layer in lora_sites(model):
        parts, weights = parts_at(layer)
        ours_A, ours_B = combine_site(parts, weights, "dare_ties", 4, density=0.5)
        assert torch.equal(ours_A, layer.lora_A["new"].weight)
        assert torch.equal(ours_B, layer.lora_B["new"].weight)
    # Another state gives other masks: the equality above is not an accident of the data.
    parts, weights = parts_at(lora_sites(model)[0][1])
    again, _ = combine_site(parts, weights, "dare_ties", 4, density=0.5)
    assert not torch.equal(again, lora_sites(model)[0][1].lora_A["new"].weight)


def test_cat_and_svd_are_the_weighted_sum():
    """``cat`` is exactly ``Σ w_k s_k B_k A_k``; ``svd`` too when its rank holds that sum."""
    torch.manual_seed(0)
    parts = [Part(torch.randn(r, 12), torch.randn(10, r), s) for r, s in ((1, 2.0), (3, 0.5))]
    weights = [0.5, -2.0]
    target = sum(
        w * p.scaling * (p.lora_B.double() @ p.lora_A.double())
        for p, w in zip(parts, weights, strict=True)
    )
    for combination, rank in (("cat", 4), ("svd", 4), ("svd", 13)):  # 13 > min(out, in): padded
        lora_A, lora_B = combine_site(parts, weights, combination, rank)
        assert lora_A.shape == (rank, 12) and lora_B.shape == (10, rank)
        torch.testing.assert_close(lora_B.double() @ lora_A.double(), target, atol=1e-5, rtol=0)
    # rank 1 < 4: the best rank-1 approximation (Eckart–Young), σ2 away in spectral norm.
    lora_A, lora_B = combine_site(parts, weights, "svd", 1)
    sigma = torch.linalg.svdvals(target)
    assert float(torch.linalg.matrix_norm(lora_B.double() @ lora_A.double() - target, 2)) == (
        pytest.approx(float(sigma[1]), rel=1e-5)
    )


def test_mergers_by_hand():
    """TIES on three entries worked by hand; the sign election's two methods differ."""
    t = [
        torch.tensor([3.0, -1.0, 0.5]),
        torch.tensor([-1.0, -1.0, 0.0]),
        torch.tensor([-1.0, 2.0, -0.2]),
    ]
    stacked = torch.stack(t)
    # total: sums (1, 0, 0.3) -> signs (+, +, +); frequency: (-1, -1, 0) -> (-, -, +)
    assert majority_sign_mask(stacked, "total").tolist() == [
        [True, False, True],
        [False, False, False],
        [False, True, False],
    ]
    assert majority_sign_mask(stacked, "frequency")[:, 0].tolist() == [False, True, True]
    weights = torch.tensor([1.0, 2.0, 3.0])
    merged = merge_tensors(t, weights, "ties", density=1.0)
    assert merged.tolist() == pytest.approx([3.0, 6.0, 0.5])
    # density 2/3 keeps the two largest |t| of each task tensor: 0.5, -1 (first of the ties),
    # -0.2 are dropped.
    pruned = merge_tensors(t, weights, "magnitude_prune", density=2 / 3)
    assert pruned.tolist() == pytest.approx([3 - 2 - 3, -1 - 2 + 6, 0.0])


def test_dare_keeps_the_expectation():
    """DARE's rescaling: the mean over many draws approaches the unpruned merge."""
    generator = torch.Generator().manual_seed(0)
    t = [torch.full((20_000,), 1.0), torch.full((20_000,), -0.5)]
    merged = merge_tensors(t, torch.tensor([1.0, 1.0]), "dare_linear", 0.25, generator=generator)
    assert float(merged.mean()) == pytest.approx(0.5, abs=0.03)
    assert set(merged.unique().tolist()) <= {0.0, 4.0, -2.0, 2.0}


class EmbedConvLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(20, 8)
        self.conv = torch.nn.Conv2d(3, 6, 3)
        self.point = torch.nn.Conv2d(6, 5, 1)
        self.lin = torch.nn.Linear(8, 5)


@pytest.mark.parametrize("combination", ["linear", "cat", "svd", "ties", "magnitude_prune_svd"])
def test_embedding_and_convolution_sites_equal_peft(combination):
    """Embeddings (peft's ``lora_embedding_A/B``), a 3×3 and a 1×1 convolution: the factor-wise
    combinations and ``cat`` bit for bit; the SVD ones equal up to rounding on a 3×3 kernel
    (peft computes its ΔW by a convolution of the factors, here ``B·A`` on the flat kernel)."""
    torch.manual_seed(0)
    targets = ["emb", "conv", "point", "lin"]
    ranks = [3, 3] if combination in ("linear", "ties") else [2, 3]
    model = None
    for name, r in zip(["fr", "de"], ranks, strict=True):
        config = peft.LoraConfig(r=r, lora_alpha=5, target_modules=targets, init_lora_weights=False)
        if model is None:
            model = peft.get_peft_model(EmbedConvLinear(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    options = {"density": 0.5} if combination in ("ties", "magnitude_prune_svd") else {}
    model.add_weighted_adapter(["fr", "de"], [0.8, -1.2], "mix", combination, **options)
    rank = combined_rank(ranks, combination)
    for name in targets:
        layer = model.base_model.model.get_submodule(name)
        embedding = name == "emb"
        pairs = (
            (layer.lora_embedding_A, layer.lora_embedding_B)
            if embedding
            else ({k: m.weight for k, m in layer.lora_A.items()},
                  {k: m.weight for k, m in layer.lora_B.items()})
        )  # fmt: skip
        parts = [Part(pairs[0][k].detach(), pairs[1][k].detach(), layer.scaling[k])
                 for k in ("fr", "de")]  # fmt: skip
        ours_A, ours_B = combine_site(parts, [0.8, -1.2], combination, rank, **options)
        theirs_A, theirs_B = pairs[0]["mix"], pairs[1]["mix"]
        assert ours_A.shape == theirs_A.shape and ours_B.shape == theirs_B.shape
        if combination in ON_DELTA and name == "conv":
            flat = lambda a, b: b.flatten(1) @ a.flatten(1)  # noqa: E731
            torch.testing.assert_close(
                flat(ours_A, ours_B), flat(theirs_A.detach(), theirs_B.detach()),
                rtol=0, atol=1e-5,
            )  # fmt: skip
        else:
            assert torch.equal(ours_A, theirs_A) and torch.equal(ours_B, theirs_B), name
