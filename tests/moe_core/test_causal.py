"""The MoE layer in a causal stack: a decoder position's output does not depend on later positions
with token-choice dropless routing; expert choice, capacity dropping and Soft-MoE do leak (which
is why ``causal=True`` refuses them); `MoETensor` hands back a plain tensor while
`collect_aux_losses` still sees the layer's losses."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from moe_core import (
    ExpertBank,
    ExpertChoiceRouter,
    HashRouter,
    MoE,
    MoETensor,
    Routing,
    SoftMoE,
    SwitchRouter,
    TopKRouter,
    collect_aux_losses,
)

D, H, E, VOCAB, B, N = 8, 16, 4, 40, 3, 8


class TinyDecoder(nn.Module):
    """Embedding -> causal self-attention -> MoE FFN (through `MoETensor`), both residual."""

    def __init__(self, moe: nn.Module) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.attn = nn.MultiheadAttention(D, num_heads=2, batch_first=True)
        self.ffn = MoETensor(moe)

    def forward(self, ids_BN: Tensor) -> Tensor:
        x_BND = self.embed(ids_BN)
        n = ids_BN.shape[1]
        future_NN = torch.ones(n, n, dtype=torch.bool).triu(1)  # True = may not attend
        a_BND, _ = self.attn(x_BND, x_BND, x_BND, attn_mask=future_NN, need_weights=False)
        x_BND = x_BND + a_BND
        kwargs = {"token_ids": ids_BN} if isinstance(self.ffn.layer, MoE) else {}
        return x_BND + self.ffn(x_BND, **kwargs)


def _routers() -> dict[str, nn.Module]:
    return {
        "topk": TopKRouter(D, E, top_k=2, noisy=True),
        "switch": SwitchRouter(D, E, jitter=0.1),
        "hash": HashRouter(D, E, vocab_size=VOCAB),
    }


def _run(model: nn.Module, ids: Tensor, seed: int = 0) -> Tensor:
    torch.manual_seed(seed)  # the same router noise for both runs
    return model(ids).detach()


def _perturbed(ids: Tensor, after: int, seed: int) -> Tensor:
    """``ids`` with every position after ``after`` drawn again (in every sequence)."""
    gen = torch.Generator().manual_seed(seed)
    out = ids.clone()
    out[:, after + 1 :] = torch.randint(0, VOCAB, out[:, after + 1 :].shape, generator=gen)
    return out


def _leaks(model: nn.Module, ids: Tensor, after: int, seeds: range = range(4)) -> bool:
    """Whether drawing the positions after ``after`` again changes any output at or before it."""
    base = _run(model, ids)
    return any(
        not torch.allclose(_run(model, _perturbed(ids, after, s))[:, : after + 1], base[:, : after + 1],
                           atol=1e-6, rtol=0)
        for s in seeds
    )


@pytest.mark.parametrize("router", ["topk", "switch", "hash"])
@pytest.mark.parametrize("training", [False, True])
def test_token_choice_dropless_layer_is_causal(router: str, training: bool) -> None:
    torch.manual_seed(0)
    model = TinyDecoder(MoE(_routers()[router], ExpertBank(E, D, H), causal=True)).train(training)
    ids = torch.randint(0, VOCAB, (B, N), generator=torch.Generator().manual_seed(1))
    base = _run(model, ids)
    base_counts = model.ffn.layer.last_stats.tokens_per_expert_E.tolist()
    count_changed = False
    for after in (0, 3, 6):
        for seed in range(3):
            out = _run(model, _perturbed(ids, after, seed))
            torch.testing.assert_close(out[:, : after + 1], base[:, : after + 1], atol=1e-6, rtol=0)
            # the perturbation matters: later outputs (and the experts' loads) change
            assert not torch.allclose(out[:, after + 1 :], base[:, after + 1 :])
            count_changed |= model.ffn.layer.last_stats.tokens_per_expert_E.tolist() != base_counts
    assert count_changed, "no perturbation moved a token to another expert: the test proves nothing"


def test_expert_choice_capacity_and_soft_moe_leak_later_positions() -> None:
    """Why ``causal=True`` refuses them: in the same decoder, changing later positions changes an
    earlier position's output."""
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (B, N), generator=torch.Generator().manual_seed(1))
    layers = {
        "expert_choice": MoE(ExpertChoiceRouter(D, E, capacity_factor=1.0), ExpertBank(E, D, H)),
        "capacity": MoE(TopKRouter(D, E, top_k=2), ExpertBank(E, D, H), capacity_factor=0.5),
        "soft_moe": SoftMoE(D, ExpertBank(E, D, H)),
    }
    for name, layer in layers.items():
        assert _leaks(TinyDecoder(layer).eval(), ids, after=2), name
    # and the dropless token-choice layer with the same weights does not
    dropless = MoE(layers["capacity"].router, layers["capacity"].experts, causal=True)
    assert not _leaks(TinyDecoder(dropless).eval(), ids, after=2)


def test_causal_layer_refuses_what_mixes_tokens() -> None:
    bank = ExpertBank(E, D, H)
    with pytest.raises(ValueError, match="expert-choice routing"):
        MoE(ExpertChoiceRouter(D, E), bank, causal=True)
    with pytest.raises(ValueError, match=r"capacity_factor=None \(dropless\), got 1.25"):
        MoE(TopKRouter(D, E), bank, capacity_factor=1.25, causal=True)
    with pytest.raises(ValueError, match="SoftMoE cannot be causal"):
        SoftMoE(D, bank, causal=True)
    with pytest.raises(ValueError, match="causal must be True or False"):
        MoE(TopKRouter(D, E), bank, causal=1)
    assert "causal=True" in repr(MoE(TopKRouter(D, E), bank, causal=True))

    class SneakyRouter(nn.Module):  # an expert-choice router that does not say so
        def __init__(self) -> None:
            super().__init__()
            self.inner = ExpertChoiceRouter(D, E)

        def forward(self, x: Tensor, *, token_ids_T: Tensor | None = None) -> Routing:
            return self.inner(x)

    layer = MoE(SneakyRouter(), bank, causal=True)
    with pytest.raises(ValueError, match="expert-choice Routing"):
        layer(torch.randn(5, D))
    MoE(SneakyRouter(), bank)(torch.randn(5, D))  # fine outside a causal stack


def test_moe_tensor_returns_the_output_and_collect_aux_losses_sees_the_losses() -> None:
    torch.manual_seed(2)
    layer = MoE(TopKRouter(D, E, top_k=2), ExpertBank(E, D, H), causal=True)
    model = TinyDecoder(layer)
    ids = torch.randint(0, VOCAB, (B, N))
    y = model(ids)
    assert isinstance(y, Tensor) and y.shape == (B, N, D)
    aux = collect_aux_losses(model)
    assert set(aux) == {"load_balance", "z_loss", "importance"}
    for name, value in aux.items():
        assert value is layer.last_aux_losses[name]
    (y.sum() + aux["load_balance"]).backward()
    assert layer.router.gate.weight.grad is not None
    x = torch.randn(2, 5, D)
    torch.testing.assert_close(MoETensor(layer)(x), layer(x).output)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[:, -1] = False
    masked = MoETensor(layer)(x, token_mask=mask)  # keyword arguments go through
    assert masked[:, -1].abs().max() == 0
    soft = MoETensor(SoftMoE(D, ExpertBank(E, D, H)))
    assert soft(x).shape == x.shape
    with pytest.raises(ValueError, match="MoETensor: layer must be an MoE layer"):
        MoETensor(nn.Linear(D, D))
