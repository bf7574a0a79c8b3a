"""The translation network: a pre-LayerNorm encoder-decoder Transformer (Vaswani et al. 2017;
pre-LN as in Xiong et al. 2020) whose feed-forward blocks are `moe_core.MoE` layers, built by the
one `build_model(config)`.

Token-choice MoE layers (top-k, Switch top-1, hash routing by token id) of the encoder may have a
training capacity; in eval mode they are dropless, and the decoder's are always dropless
(``MoE(causal=True)``: with a capacity, whether a token is dropped would depend on later tokens). Expert choice (Zhou et al. 2022) is used in the encoder
only: an expert choosing among a batch's tokens would see future target tokens, so the decoder's
MoE layers then use top-k token choice. Embeddings are shared by source, target and the output
projection (tied, Press & Wolf 2017), with sinusoidal positions. Padding tokens are masked out of
attention and left out of routing, aux losses and routing stats (the MoE layer's ``token_mask``).

Decoding uses `DecoderCache`: the keys/values of every decoder layer's self-attention grow by one
position per step and the cross-attention keys/values of the source are computed once, so a step
costs one position, not the whole prefix.

Shape legend: B sentences, S source length, T target length, D model, H heads, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_apps.translation.config import ModelConfig
from moe_apps.translation.data import TranslationBatch
from moe_apps.translation.vocab import PAD
from moe_core import FFN, ROUTERS, ExpertBank, MoE


def sinusoid_positions(start: int, length: int, d_model: int, device: torch.device) -> Tensor:
    """(length, D) sinusoidal position encodings of positions start .. start + length - 1."""
    position = torch.arange(start, start + length, device=device, dtype=torch.float32)[:, None]
    rate = torch.exp(torch.arange(0, d_model, 2, device=device, dtype=torch.float32)
                     * (-math.log(10000.0) / d_model))
    table = torch.zeros(length, d_model, device=device)
    table[:, 0::2] = torch.sin(position * rate)
    table[:, 1::2] = torch.cos(position * rate)
    return table


class Attention(nn.Module):
    """Multi-head attention on `F.scaled_dot_product_attention`; keys/values projected separately
    so that they can be cached."""

    def __init__(self, d_model: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.query = nn.Linear(d_model, d_model)
        self.key_value = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def _heads(self, x_BND: Tensor) -> Tensor:
        B, N, D = x_BND.shape
        return x_BND.view(B, N, self.num_heads, D // self.num_heads).transpose(1, 2)

    def keys_values(self, x_BMD: Tensor) -> tuple[Tensor, Tensor]:
        k_BMD, v_BMD = self.key_value(x_BMD).chunk(2, dim=-1)
        return self._heads(k_BMD), self._heads(v_BMD)

    def forward(self, x_BND: Tensor, k_BHMd: Tensor, v_BHMd: Tensor, *, mask: Tensor | None = None,
                causal: bool = False) -> Tensor:
        q_BHNd = self._heads(self.query(x_BND))
        p = self.dropout if self.training else 0.0
        y_BHNd = F.scaled_dot_product_attention(q_BHNd, k_BHMd.to(q_BHNd.dtype), v_BHMd.to(q_BHNd.dtype),
                                                attn_mask=mask, dropout_p=p, is_causal=causal)
        B, _, N, _ = y_BHNd.shape
        return self.out(y_BHNd.transpose(1, 2).reshape(B, N, -1))


class FeedForward(nn.Module):
    """A dense FFN or an MoE layer behind one plain-tensor interface ``(x, ids, mask) -> y``.

    For MoE layers it sets the layer's capacity (training capacity, or dropless in eval mode) and,
    when ``record_routing`` is on, keeps the last `Routing` and token mask for `--show-routing`.
    """

    def __init__(self, inner: nn.Module, *, train_capacity: float | None = None) -> None:
        super().__init__()
        self.inner, self.train_capacity = inner, train_capacity
        self.is_moe = isinstance(inner, MoE)
        self.record_routing = False
        self.last_routing: tuple[object, Tensor] | None = None

    def forward(self, x_BND: Tensor, ids_BN: Tensor, mask_BN: Tensor) -> Tensor:
        if not self.is_moe:
            return self.inner(x_BND)
        self.inner.capacity_factor = self.train_capacity if self.training else None
        out = self.inner(x_BND, token_ids=ids_BN, token_mask=mask_BN)
        if self.record_routing:
            self.last_routing = (out.routing, mask_BN)
        return out.output


class EncoderLayer(nn.Module):
    """Pre-LN encoder block: ``x + attn(LN(x))``, then ``x + ffn(LN(x))`` (dense or MoE)."""

    def __init__(self, config: ModelConfig, ffn: FeedForward) -> None:
        super().__init__()
        D = config.d_model
        self.norm_attn, self.norm_ffn = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = Attention(D, config.num_heads, config.dropout)
        self.ffn, self.drop = ffn, nn.Dropout(config.dropout)

    def forward(self, x_BSD: Tensor, ids_BS: Tensor, mask_BS: Tensor, attn_mask: Tensor) -> Tensor:
        h = self.norm_attn(x_BSD)
        k, v = self.attn.keys_values(h)
        x_BSD = x_BSD + self.drop(self.attn(h, k, v, mask=attn_mask))
        return x_BSD + self.drop(self.ffn(self.norm_ffn(x_BSD), ids_BS, mask_BS))


class DecoderLayer(nn.Module):
    """Pre-LN decoder block: causal self-attention (keys/values cached when decoding), attention to
    the source, then the feed-forward block (dense or causal dropless MoE)."""

    def __init__(self, config: ModelConfig, ffn: FeedForward) -> None:
        super().__init__()
        D = config.d_model
        self.norm_self, self.norm_cross, self.norm_ffn = nn.LayerNorm(D), nn.LayerNorm(D), nn.LayerNorm(D)
        self.self_attn = Attention(D, config.num_heads, config.dropout)
        self.cross_attn = Attention(D, config.num_heads, config.dropout)
        self.ffn, self.drop = ffn, nn.Dropout(config.dropout)

    def forward(self, x_BTD: Tensor, ids_BT: Tensor, mask_BT: Tensor, cache: DecoderCache,
                index: int) -> Tensor:
        h = self.norm_self(x_BTD)
        k, v = self.self_attn.keys_values(h)
        if cache.incremental:
            k, v = cache.extend(index, k, v)
        causal = x_BTD.shape[1] > 1  # one new position attends to the whole cached prefix
        x_BTD = x_BTD + self.drop(self.self_attn(h, k, v, causal=causal))
        ck, cv = cache.cross[index]
        x_BTD = x_BTD + self.drop(self.cross_attn(self.norm_cross(x_BTD), ck, cv, mask=cache.src_mask))
        return x_BTD + self.drop(self.ffn(self.norm_ffn(x_BTD), ids_BT, mask_BT))


@dataclass
class Memory:
    """The encoder's output for a batch of sources."""

    states_BSD: Tensor
    mask_BS: Tensor  # True = real source token


class DecoderCache:
    """Per decoder layer: cross-attention keys/values of the source and, when ``incremental``, the
    self-attention keys/values of the positions decoded so far. `reorder` keeps rows (beams)."""

    def __init__(self, cross: list[tuple[Tensor, Tensor]], src_mask: Tensor, incremental: bool) -> None:
        self.cross, self.src_mask, self.incremental = cross, src_mask, incremental
        self.self_kv: list[tuple[Tensor, Tensor] | None] = [None] * len(cross)
        self.length = 0

    def extend(self, index: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        old = self.self_kv[index]
        if old is not None:
            k, v = torch.cat([old[0], k], dim=2), torch.cat([old[1], v], dim=2)
        self.self_kv[index] = (k, v)
        return k, v

    def reorder(self, rows: Tensor, source_rows: Tensor | None) -> None:
        """Keep ``rows`` of the decoded positions' keys/values and ``source_rows`` of the source's
        (None = the source rows stay: the beams of a sentence share its source, so beam search
        passes them only when sentences leave the batch)."""
        if source_rows is not None:
            self.cross = [(k.index_select(0, source_rows), v.index_select(0, source_rows)) for k, v in self.cross]
            self.src_mask = self.src_mask.index_select(0, source_rows)
        self.self_kv = [None if kv is None else (kv[0].index_select(0, rows), kv[1].index_select(0, rows))
                        for kv in self.self_kv]


class Seq2SeqTransformer(nn.Module):
    """Encoder-decoder with tied embeddings; ``forward(batch) -> logits_BTV``."""

    def __init__(self, config: ModelConfig, encoder: list[EncoderLayer], decoder: list[DecoderLayer]) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model, padding_idx=PAD)
        nn.init.normal_(self.embed.weight, std=config.d_model ** -0.5)
        with torch.no_grad():
            self.embed.weight[PAD].zero_()
        self.encoder, self.decoder = nn.ModuleList(encoder), nn.ModuleList(decoder)
        self.encoder_norm, self.decoder_norm = nn.LayerNorm(config.d_model), nn.LayerNorm(config.d_model)
        self.drop = nn.Dropout(config.dropout)

    def _embed(self, ids_BN: Tensor, start: int) -> Tensor:
        x = self.embed(ids_BN) * math.sqrt(self.config.d_model)
        return self.drop(x + sinusoid_positions(start, ids_BN.shape[1], self.config.d_model, ids_BN.device))

    def encode(self, src_BS: Tensor) -> Memory:
        mask_BS = src_BS != PAD
        attn_mask = mask_BS[:, None, None, :]
        x = self._embed(src_BS, 0)
        for layer in self.encoder:
            x = layer(x, src_BS, mask_BS, attn_mask)
        return Memory(self.encoder_norm(x), mask_BS)

    def new_cache(self, memory: Memory, incremental: bool = True) -> DecoderCache:
        cross = [layer.cross_attn.keys_values(memory.states_BSD) for layer in self.decoder]
        return DecoderCache(cross, memory.mask_BS[:, None, None, :], incremental)

    def decode(self, tgt_BT: Tensor, cache: DecoderCache) -> Tensor:
        """Logits ``(B, T, V)`` of the target positions given. With an incremental cache, ``tgt_BT``
        holds only the new positions (they follow the ``cache.length`` cached ones)."""
        start = cache.length if cache.incremental else 0
        if start and tgt_BT.shape[1] != 1:
            raise ValueError("an incremental decoder cache takes one new position per step after the first")
        x = self._embed(tgt_BT, start)
        mask_BT = tgt_BT != PAD
        for index, layer in enumerate(self.decoder):
            x = layer(x, tgt_BT, mask_BT, cache, index)
        if cache.incremental:
            cache.length += tgt_BT.shape[1]
        return F.linear(self.decoder_norm(x), self.embed.weight)

    def forward(self, batch: TranslationBatch) -> Tensor:
        memory = self.encode(batch.src_BS)
        return self.decode(batch.tgt_in_BT, self.new_cache(memory, incremental=False))

    @contextmanager
    def without_routing_stats(self) -> Iterator[None]:
        """Skip the MoE layers' `RoutingStats` (a host sync per layer and step) while decoding."""
        layers = [ffn.inner for _, ffn in self.moe_layers()]
        saved = [layer.track_stats for layer in layers]
        for layer in layers:
            layer.track_stats = False
        try:
            yield
        finally:
            for layer, value in zip(layers, saved, strict=True):
                layer.track_stats = value

    def moe_layers(self) -> list[tuple[str, FeedForward]]:
        """``[("encoder.0", ffn), ("decoder.1", ffn), ...]`` for the MoE feed-forward blocks."""
        named = [(f"encoder.{i}", layer.ffn) for i, layer in enumerate(self.encoder)]
        named += [(f"decoder.{i}", layer.ffn) for i, layer in enumerate(self.decoder)]
        return [(name, ffn) for name, ffn in named if ffn.is_moe]


def _feed_forward(config: ModelConfig, index: int, *, causal: bool) -> FeedForward:
    D, H = config.d_model, config.expert_hidden
    if not config.is_moe_layer(index):
        return FeedForward(FFN(D, config.dense_hidden, config.activation))
    router_name = config.router
    if router_name == "expert-choice" and causal:
        router_name = "topk"  # expert choice needs every token of the batch: not in a causal stack
    E = config.num_experts
    if router_name == "topk":
        router = ROUTERS["topk"](D, E, top_k=config.top_k)
    elif router_name == "switch":
        router = ROUTERS["switch"](D, E)
    elif router_name == "hash":
        router = ROUTERS["hash"](D, E, vocab_size=config.vocab_size)
    else:
        router = ROUTERS["expert_choice"](D, E, capacity_factor=float(config.active_experts
                                                                       - config.shared_expert))
    shared = FFN(D, H, config.activation) if config.shared_expert else None
    experts = ExpertBank(E, D, H, activation=config.activation, method=config.expert_kernel)
    moe = MoE(router=router, experts=experts, shared_experts=shared, causal=causal)
    # The decoder is dropless (MoE(causal=True) refuses capacity: a dropped token would depend on
    # later ones); expert choice has its capacity in the router.
    capacity = None if causal or router_name == "expert-choice" else config.capacity_factor
    return FeedForward(moe, train_capacity=capacity)


def build_model(config: ModelConfig) -> Seq2SeqTransformer:
    """The model of ``config`` (the only place where translation models are wired)."""
    encoder = [EncoderLayer(config, _feed_forward(config, i, causal=False))
               for i in range(config.encoder_layers)]
    decoder = [DecoderLayer(config, _feed_forward(config, i, causal=True))
               for i in range(config.decoder_layers)]
    return Seq2SeqTransformer(config, encoder, decoder)


def count_parameters(model: Seq2SeqTransformer) -> dict[str, int]:
    """Total parameters, and those of the routed experts (which a token uses only K/E of)."""
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for _, ffn in model.moe_layers() for p in ffn.inner.experts.parameters())
    return {"total": total, "routed_experts": experts}
