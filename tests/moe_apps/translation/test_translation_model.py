"""The translation network: causality of the decoder, padding invariance, the dense twin's width,
expert choice kept out of the decoder, dropless inference, and cached decoding against both the
uncached path and an independent one-sentence beam search."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from moe_apps.translation.config import ModelConfig
from moe_apps.translation.data import TranslationBatch, pad_rows
from moe_apps.translation.decode import beam_decode, greedy_decode, max_output_lengths
from moe_apps.translation.model import build_model
from moe_apps.translation.vocab import BOS, EOS, PAD
from moe_core import FFN, MoE, TopKRouter

ROUTERS = [("topk", False), ("switch", True), ("hash", False), ("expert-choice", False)]


def _model(router: str = "topk", shared: bool = False, **changes) -> torch.nn.Module:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=300, d_model=32, num_heads=2, encoder_layers=2, decoder_layers=2,
                         num_experts=4, expert_hidden=16, router=router, shared_expert=shared,
                         dropout=0.0, **changes)
    return build_model(config).eval()


def _batch(src: list[list[int]], tgt: list[list[int]]) -> TranslationBatch:
    src_BS = pad_rows([s + [EOS] for s in src])
    tgt_BT = pad_rows([[BOS] + t for t in tgt])
    return TranslationBatch(src_BS, tgt_BT, tgt_BT)


@pytest.mark.parametrize(("router", "shared"), ROUTERS)
def test_later_target_tokens_do_not_change_earlier_logits(router: str, shared: bool) -> None:
    model = _model(router, shared)
    src = [[5, 6, 7, 8], [9, 10, 11, 12]]
    a = model(_batch(src, [[20, 21, 22, 23, 24], [30, 31, 32, 33, 34]]))
    b = model(_batch(src, [[20, 21, 22, 99, 98], [30, 31, 32, 97, 96]]))
    # positions 0..3 read <s>, 20, 21, 22: the same in both; position 4 reads a changed token
    torch.testing.assert_close(a[:, :4], b[:, :4], rtol=0, atol=1e-5)
    assert not torch.allclose(a[:, 4], b[:, 4])


@pytest.mark.parametrize(("router", "shared"), ROUTERS)
def test_padding_of_other_sentences_does_not_change_a_sentence(router: str, shared: bool) -> None:
    model = _model(router, shared)
    alone = model(_batch([[5, 6, 7]], [[20, 21]]))
    together = model(_batch([[5, 6, 7], [8, 9, 10, 11, 12, 13, 14]], [[20, 21], [22, 23, 24, 25, 26]]))
    if router == "expert-choice":  # the experts choose among the batch's tokens: other sentences matter
        assert together.shape == (2, 6, 300)
        return
    torch.testing.assert_close(together[:1, :3], alone, rtol=0, atol=1e-5)


def test_dense_twin_has_the_active_ffn_width_of_the_moe_model() -> None:
    for router, shared, k in (("topk", False, 2), ("topk", True, 2), ("switch", False, 1), ("hash", True, 1)):
        moe = _model(router, shared, top_k=k)
        dense = _model(router, shared, top_k=k, model="dense")
        assert not dense.moe_layers()
        width = dense.encoder[0].ffn.inner.d_hidden
        routed = 2 if router == "topk" else 1
        assert width == (routed + shared) * 16
        layer = moe.encoder[0].ffn.inner
        active = layer.router.top_k * layer.experts.d_hidden + (layer.shared_experts.d_hidden if shared else 0)
        assert active == width


def test_moe_every_other_layer() -> None:
    model = _model(moe_every=2)
    assert [name for name, _ in model.moe_layers()] == ["encoder.1", "decoder.1"]
    assert isinstance(model.encoder[0].ffn.inner, FFN)


def test_expert_choice_only_in_the_encoder_and_causal_decoder_layers() -> None:
    model = _model("expert-choice")
    for name, ffn in model.moe_layers():
        assert ffn.inner.causal == name.startswith("decoder")
    assert all(isinstance(layer.ffn.inner.router, TopKRouter) for layer in model.decoder)
    assert not any(isinstance(layer.ffn.inner.router, TopKRouter) for layer in model.encoder)


def test_training_capacity_is_dropped_at_inference() -> None:
    model = _model(capacity_factor=0.5)
    batch = _batch([[5, 6, 7, 8, 9, 10, 11, 12]] * 4, [[20, 21, 22]] * 4)
    encoder_moe = model.encoder[0].ffn.inner
    model.train()
    model(batch)
    assert encoder_moe.last_stats.dropped_fraction > 0
    model.eval()
    model(batch)
    assert encoder_moe.capacity_factor is None and encoder_moe.last_stats.dropped_fraction == 0
    assert all(layer.ffn.inner.capacity_factor is None for layer in model.decoder)


def _sources() -> list[list[int]]:
    # lengths differ, so sentences finish (and leave the batch) at different steps
    return [[5, 6, 7, 8, 9], [10, 11, 12], [20], [30, 31, 32, 33, 34, 35, 36, 37], [38, 39]]


@pytest.mark.parametrize(("router", "shared"), ROUTERS)
def test_cached_and_uncached_decoding_agree(router: str, shared: bool) -> None:
    model = _trained(router, shared)
    sources = _sources()
    assert _finish_early(greedy_decode(model, sources), sources)
    assert greedy_decode(model, sources) == greedy_decode(model, sources, use_cache=False)
    beam = beam_decode(model, sources, beam=3, length_penalty=1.0)
    assert beam == beam_decode(model, sources, beam=3, length_penalty=1.0, use_cache=False)
    caps = max_output_lengths([len(s) for s in sources])
    assert all(len(out) <= cap for out, cap in zip(beam, caps, strict=True))


@functools.cache
def _trained(router: str, shared: bool) -> torch.nn.Module:
    """A model trained briefly to copy its source, so that hypotheses end with eos at different
    steps (an untrained model runs every hypothesis to its cap)."""
    model = _model(router, shared).train()
    generator = torch.Generator().manual_seed(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        rows = [torch.randint(4, 40, (int(n),), generator=generator).tolist()
                for n in torch.randint(1, 7, (16,), generator=generator)]
        batch = _batch(rows, rows)
        target = pad_rows([r + [EOS] for r in rows])
        loss = torch.nn.functional.cross_entropy(model(batch).flatten(0, 1), target.flatten(), ignore_index=PAD)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def _finish_early(outputs: list[list[int]], sources: list[list[int]]) -> bool:
    caps = max_output_lengths([len(s) for s in sources])
    return any(len(out) < cap for out, cap in zip(outputs, caps, strict=True))


def _reference_beam(model, source: list[int], beam: int, alpha: float, cap: int) -> list[int]:
    """One sentence, no cache, no batching: the textbook beam search with the same rules."""
    live: list[tuple[float, list[int]]] = [(0.0, [])]
    finished: list[tuple[float, list[int]]] = []
    for step in range(cap + 1):
        candidates = []
        for score, tokens in live:
            logits = model(_batch([source], [tokens]))[0, -1].float()
            logp = torch.log_softmax(logits, -1)
            logp[PAD] = logp[BOS] = -math.inf
            if step >= cap:
                logp[torch.arange(logp.numel()) != EOS] = -math.inf
            candidates += [(score + float(lp), tokens, tok) for tok, lp in enumerate(logp.tolist())]
        candidates.sort(key=lambda c: -c[0])
        new_live = []
        for rank, (score, tokens, tok) in enumerate(candidates[: 2 * beam]):
            if score == -math.inf:
                break
            if tok == EOS:
                if rank < beam:
                    finished.append((score / (len(tokens) + 1) ** alpha, tokens))
            elif len(new_live) < beam:
                new_live.append((score, tokens + [tok]))
        if len(finished) >= beam or not new_live:
            break
        live = new_live
    return max(finished, key=lambda f: f[0])[1]


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_batched_beam_search_matches_a_one_sentence_reference(alpha: float) -> None:
    model = _trained("topk", False)
    sources = _sources()[:3]
    got = beam_decode(model, sources, beam=3, length_penalty=alpha, max_len_a=1.0, max_len_b=3)
    caps = max_output_lengths([len(s) for s in sources], 1.0, 3)
    expected = [_reference_beam(model, s, 3, alpha, cap) for s, cap in zip(sources, caps, strict=True)]
    assert got == expected


def test_decoder_refuses_expert_choice_through_moe_core() -> None:
    from moe_core import ExpertBank, ExpertChoiceRouter

    with pytest.raises(ValueError, match="causal"):
        MoE(ExpertChoiceRouter(8, 2), ExpertBank(2, 8, 8), causal=True)


def test_empty_input_decodes_to_nothing() -> None:
    model = _model()
    assert greedy_decode(model, []) == [] and beam_decode(model, [], beam=2) == []
