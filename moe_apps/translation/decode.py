"""Greedy and batched beam search over `Seq2SeqTransformer`, with cached keys/values.

Beam search (as in fairseq, Ott et al. 2019): every sentence keeps ``beam`` live hypotheses; each
step scores the ``beam * V`` extensions, takes the best ``2 * beam``, finishes those that end in
eos (among the best ``beam``), and keeps the best ``beam`` that do not. A hypothesis's final score
is ``sum log p / length ** length_penalty`` (length counts the eos). A sentence is done when it has
``beam`` finished hypotheses or reaches its length cap ``ceil(max_len_a * source length) +
max_len_b`` subwords, where its live hypotheses are finished as they are. Finished sentences leave
the batch (their cache rows are dropped), so the batch shrinks as it goes.

``use_cache=False`` recomputes the whole prefix at every step (the reference the cache is tested
against; same outputs).

Shape legend: B sentences, A those still decoding, K beam, R = A * K hypothesis rows, T prefix
length, S source length, V vocabulary, X = K * V candidates of a sentence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from moe_apps.translation.data import source_batch
from moe_apps.translation.model import DecoderCache, Seq2SeqTransformer
from moe_apps.translation.vocab import BOS, EOS, PAD


def max_output_lengths(source_lengths: Sequence[int], a: float = 1.5, b: int = 10) -> list[int]:
    """The cap on output subwords (eos excluded) of each sentence: ``ceil(a * source) + b``."""
    return [math.ceil(a * n) + b for n in source_lengths]


class _Stepper:
    """Next-token log-probabilities for rows of prefixes, with or without the cache."""

    def __init__(self, model: Seq2SeqTransformer, src_BS: Tensor, repeat: int, use_cache: bool) -> None:
        memory = model.encode(src_BS)
        if repeat > 1:
            memory.states_BSD = memory.states_BSD.repeat_interleave(repeat, 0)
            memory.mask_BS = memory.mask_BS.repeat_interleave(repeat, 0)
        self.model, self.use_cache = model, use_cache
        self.cache: DecoderCache = model.new_cache(memory, incremental=use_cache)

    def log_probs(self, prefix_RT: Tensor) -> Tensor:
        """(R, V) float32 log-probabilities of the token after each row's prefix."""
        tokens = prefix_RT[:, -1:] if self.use_cache else prefix_RT
        logits = self.model.decode(tokens, self.cache)[:, -1]
        return torch.log_softmax(logits.float(), dim=-1)

    def keep(self, rows: Tensor, source_rows: Tensor | None) -> None:
        self.cache.reorder(rows, source_rows)


@torch.no_grad()
def greedy_decode(model: Seq2SeqTransformer, sources: Sequence[Sequence[int]], *, max_len_a: float = 1.5,
                  max_len_b: int = 10, use_cache: bool = True) -> list[list[int]]:
    """The argmax translation (subword ids, no specials) of each source id list."""
    if not sources:
        return []
    with model.without_routing_stats():
        return _greedy(model, sources, max_len_a, max_len_b, use_cache)


def _greedy(model: Seq2SeqTransformer, sources: Sequence[Sequence[int]], max_len_a: float,
            max_len_b: int, use_cache: bool) -> list[list[int]]:
    device = next(model.parameters()).device
    caps_B = torch.tensor(max_output_lengths([len(s) for s in sources], max_len_a, max_len_b), device=device)
    stepper = _Stepper(model, source_batch(sources).to(device), 1, use_cache)
    prefix_BT = torch.full((len(sources), 1), BOS, dtype=torch.int64, device=device)
    done_B = torch.zeros(len(sources), dtype=torch.bool, device=device)
    for step in range(int(caps_B.max()) + 1):
        best_B = stepper.log_probs(prefix_BT).argmax(-1)
        best_B = torch.where(done_B, torch.full_like(best_B, PAD), best_B)
        best_B = torch.where(~done_B & (caps_B <= step), torch.full_like(best_B, EOS), best_B)
        done_B |= best_B == EOS
        prefix_BT = torch.cat([prefix_BT, best_B[:, None]], dim=1)
        if bool(done_B.all()):
            break
    out = []
    for row in prefix_BT[:, 1:].tolist():
        out.append(row[: row.index(EOS)] if EOS in row else [t for t in row if t != PAD])
    return out


@torch.no_grad()
def beam_decode(model: Seq2SeqTransformer, sources: Sequence[Sequence[int]], *, beam: int = 5,
                length_penalty: float = 1.0, max_len_a: float = 1.5, max_len_b: int = 10,
                use_cache: bool = True) -> list[list[int]]:
    """The best beam-search translation (subword ids, no specials) of each source id list."""
    if beam == 1:
        return greedy_decode(model, sources, max_len_a=max_len_a, max_len_b=max_len_b, use_cache=use_cache)
    if not sources:
        return []
    with model.without_routing_stats():
        return _beam(model, sources, beam, length_penalty, max_len_a, max_len_b, use_cache)


def _beam(model: Seq2SeqTransformer, sources: Sequence[Sequence[int]], beam: int, length_penalty: float,
          max_len_a: float, max_len_b: int, use_cache: bool) -> list[list[int]]:
    device = next(model.parameters()).device
    B, K = len(sources), beam
    caps = max_output_lengths([len(s) for s in sources], max_len_a, max_len_b)
    stepper = _Stepper(model, source_batch(sources).to(device), K, use_cache)
    prefix_RT = torch.full((B * K, 1), BOS, dtype=torch.int64, device=device)
    scores_AK = torch.full((B, K), -math.inf, device=device)
    scores_AK[:, 0] = 0.0  # all beams start equal: keep one so the first step does not repeat it
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    active = list(range(B))  # sentence of each row-block
    step = 0
    while active:
        A = len(active)
        logp_AKV = stepper.log_probs(prefix_RT).view(A, K, -1)
        V = logp_AKV.shape[-1]
        logp_AKV[:, :, PAD] = -math.inf
        logp_AKV[:, :, BOS] = -math.inf
        at_cap_A = torch.tensor([step >= caps[s] for s in active], device=device)
        if bool(at_cap_A.any()):  # only eos is allowed once a sentence reaches its cap
            forced = torch.full_like(logp_AKV[at_cap_A], -math.inf)
            forced[..., EOS] = 0.0
            logp_AKV[at_cap_A] = logp_AKV[at_cap_A] + forced
        total_AX = (scores_AK[:, :, None] + logp_AKV).view(A, K * V)
        top_scores_A2K, top_index_A2K = total_AX.topk(2 * K, dim=1)
        top_scores, top_index = top_scores_A2K.tolist(), top_index_A2K.tolist()
        keep_rows, keep_tokens, keep_scores, still, kept_blocks = [], [], [], [], []
        prefix_rows = prefix_RT.tolist()
        for a, sentence in enumerate(active):
            chosen: list[tuple[int, int, float]] = []
            for rank, (score, flat) in enumerate(zip(top_scores[a], top_index[a], strict=True)):
                if score == -math.inf:
                    break
                origin, token = divmod(flat, V)
                if token == EOS:
                    if rank < K:
                        hypothesis = prefix_rows[a * K + origin][1:]
                        finished[sentence].append((score / (len(hypothesis) + 1) ** length_penalty,
                                                   hypothesis))
                elif len(chosen) < K:
                    chosen.append((origin, token, score))
            if len(finished[sentence]) >= K or not chosen:
                continue
            while len(chosen) < K:  # pad with dead copies (score -inf) to keep K rows
                chosen.append((chosen[0][0], chosen[0][1], -math.inf))
            still.append(sentence)
            kept_blocks.append(a)
            keep_rows += [a * K + origin for origin, _, _ in chosen]
            keep_tokens += [token for _, token, _ in chosen]
            keep_scores.append([score for _, _, score in chosen])
        active = still
        if not active:
            break
        rows_R = torch.tensor(keep_rows, device=device)
        if len(still) == A:
            stepper.keep(rows_R, None)  # same sentences: the source keys/values stay as they are
        else:
            blocks = [a * K + j for a in kept_blocks for j in range(K)]
            stepper.keep(rows_R, torch.tensor(blocks, device=device))
        prefix_RT = torch.cat([prefix_RT.index_select(0, rows_R),
                            torch.tensor(keep_tokens, device=device)[:, None]], dim=1)
        scores_AK = torch.tensor(keep_scores, device=device)
        step += 1
    return [max(hyps, key=lambda h: h[0])[1] if hyps else [] for hyps in finished]
