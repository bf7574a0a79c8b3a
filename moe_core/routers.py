"""Token-choice routers and the `ROUTERS` registry.

Every router is an ``nn.Module`` built as ``Cls(d_model, num_experts, **options)`` whose
``forward(x, *, token_ids_T=None)`` takes ``x`` of shape ``(..., D)``, flattens the leading dims to
T tokens and returns a `Routing` over those T tokens. Logits are computed in float32 whatever the
input dtype (the input is cast and the gate weight is used in float32, as Switch / ST-MoE advise).

* `SoftmaxRouter`: dense soft gating, every token to all E experts with the softmax weights
  (the original mixture of experts, Jacobs et al. 1991).
* `GumbelRouter`: hard Gumbel-softmax with a straight-through gradient (Jang et al. 2017), K = 1.
* `TopKRouter`: top-k gating with optional noisy gating (Shazeer et al. 2017).
* `SwitchRouter`: top-1 with the softmax probability as weight and input jitter (Fedus et al. 2021).
* `HierarchicalRouter`: a gate over groups of experts, then a gate inside each chosen group
  (the two-level hierarchical MoE of Shazeer et al. 2017).
* `HashRouter`: a fixed random token-id -> expert table, nothing to learn (Roller et al. 2021).
* ``"expert_choice"``: `moe_core.expert_choice.ExpertChoiceRouter` (Zhou et al. 2022).

Gate init (`moe_core.routing.new_gate`): normal with std 0.02 (no bias). A zero init would make
every logit tie, so top-k would send every token to expert 0 at step 0; a small random init
breaks ties while keeping the initial routing close to uniform. The sparse routers order each
token's slots best first (``k = 0`` is its top choice), which the k-major slot order of
`Routing.assignments` relies on for capacity priority; `SoftmaxRouter` lists all experts in index
order (dense, nothing dropped).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_core.checks import check_float, check_positive_int, describe_tensor, flatten_tokens
from moe_core.expert_choice import ExpertChoiceRouter
from moe_core.routing import Routing, gate_logits, new_gate

NORMALIZE_CHOICES = ("softmax_then_topk", "topk_then_softmax")


class SoftmaxRouter(nn.Module):
    """Dense soft gating: K = E, ``expert_indices_TK[t] = arange(E)``, weights = softmax probs."""

    def __init__(self, d_model: int, num_experts: int) -> None:
        super().__init__()
        check_positive_int(d_model, "d_model")
        check_positive_int(num_experts, "num_experts")
        self.d_model, self.num_experts, self.top_k = d_model, num_experts, num_experts
        self.gate = new_gate(d_model, num_experts)

    def forward(self, x: Tensor, *, token_ids_T: Tensor | None = None) -> Routing:
        logits_TE = gate_logits(self.gate, flatten_tokens(x, self.d_model, "SoftmaxRouter"))
        probs_TE = logits_TE.softmax(-1)
        T, E = probs_TE.shape
        indices_TE = torch.arange(E, device=probs_TE.device).expand(T, E).contiguous()
        return Routing(
            probs_TE, logits_TE, expert_indices_TK=indices_TE, combine_weights_TK=probs_TE
        )


class GumbelRouter(nn.Module):
    """Hard Gumbel-softmax routing, K = 1 (straight-through estimator, Jang et al. 2017).

    Training: ``y = softmax((logits + g) / temperature)`` with Gumbel noise ``g``; the token goes to
    ``argmax y`` with a forward weight of exactly 1.0 whose gradient is that of ``y[argmax]``
    (only the chosen expert is computed, so only its entry of the soft sample gets a gradient).
    Eval: no noise, ``argmax logits``, weight 1.0. ``probs_TE = softmax(logits)`` -- the
    probability that the noisy argmax picks each expert, whatever the temperature.
    """

    def __init__(self, d_model: int, num_experts: int, temperature: float = 1.0) -> None:
        super().__init__()
        check_positive_int(d_model, "d_model")
        check_positive_int(num_experts, "num_experts")
        check_float(temperature, "temperature")
        self.d_model, self.num_experts, self.top_k = d_model, num_experts, 1
        self.temperature = float(temperature)
        self.gate = new_gate(d_model, num_experts)

    def _gumbel_noise(self, logits_TE: Tensor) -> Tensor:
        """Standard Gumbel samples shaped like ``logits_TE`` (-log of Exp(1))."""
        return -torch.empty_like(logits_TE).exponential_().log()

    def forward(self, x: Tensor, *, token_ids_T: Tensor | None = None) -> Routing:
        logits_TE = gate_logits(self.gate, flatten_tokens(x, self.d_model, "GumbelRouter"))
        probs_TE = logits_TE.softmax(-1)
        if not self.training:
            index_T1 = logits_TE.argmax(-1, keepdim=True)
            return Routing(
                probs_TE, logits_TE, index_T1, torch.ones_like(index_T1, dtype=torch.float32)
            )
        soft_TE = ((logits_TE + self._gumbel_noise(logits_TE)) / self.temperature).softmax(-1)
        index_T1 = soft_TE.argmax(-1, keepdim=True)
        soft_T1 = soft_TE.gather(1, index_T1)
        weight_T1 = 1.0 + (soft_T1 - soft_T1.detach())  # value exactly 1.0, gradient of soft_T1
        return Routing(
            probs_TE, logits_TE, expert_indices_TK=index_T1, combine_weights_TK=weight_T1
        )


class TopKRouter(nn.Module):
    """Top-k token-choice gating (Shazeer et al. 2017), optionally noisy.

    Noisy gating (training only): ``H = x W_g + N(0, 1) * softplus(x W_noise)`` (``W_noise``
    starts at zero, as in the paper); the top-k and the weights use ``H``, while ``probs_TE`` and
    ``logits_TE`` are always the clean ``x W_g`` (softmax over all E) for the losses.
    ``normalize="softmax_then_topk"``: softmax over E, keep the top-k probabilities, and with
    ``renormalize=True`` rescale them to sum to 1. ``"topk_then_softmax"``: softmax over the k
    chosen logits (always sums to 1; ``renormalize`` has no effect).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 2,
        noisy: bool = False,
        normalize: str = "softmax_then_topk",
        renormalize: bool = True,
    ) -> None:
        super().__init__()
        check_positive_int(d_model, "d_model")
        check_positive_int(num_experts, "num_experts")
        check_positive_int(top_k, "top_k", maximum=num_experts)
        if normalize not in NORMALIZE_CHOICES:
            raise ValueError(
                f"normalize must be one of {list(NORMALIZE_CHOICES)}, got {normalize!r}"
            )
        for name, flag in (("noisy", noisy), ("renormalize", renormalize)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be True or False, got {flag!r}")
        self.d_model, self.num_experts, self.top_k = d_model, num_experts, top_k
        self.normalize, self.renormalize = normalize, renormalize
        self.gate = new_gate(d_model, num_experts)
        self.noise = nn.Linear(d_model, num_experts, bias=False) if noisy else None
        if self.noise is not None:
            nn.init.zeros_(self.noise.weight)

    def forward(self, x: Tensor, *, token_ids_T: Tensor | None = None) -> Routing:
        x_TD = flatten_tokens(x, self.d_model, "TopKRouter")
        logits_TE = gate_logits(self.gate, x_TD)
        probs_TE = logits_TE.softmax(-1)
        noisy = self.noise is not None and self.training
        h_TE = logits_TE
        if noisy:
            noise_std_TE = F.softplus(gate_logits(self.noise, x_TD))
            h_TE = logits_TE + torch.randn_like(logits_TE) * noise_std_TE
        top_h_TK, index_TK = h_TE.topk(self.top_k, dim=-1, sorted=True)
        if self.normalize == "topk_then_softmax":
            weight_TK = top_h_TK.softmax(-1)
        else:  # softmax over all E of the gating logits: the clean probs_TE unless noisy
            weight_TK = (h_TE.softmax(-1) if noisy else probs_TE).gather(1, index_TK)
            if self.renormalize:
                weight_TK = weight_TK / weight_TK.sum(-1, keepdim=True)
        return Routing(probs_TE, logits_TE, index_TK, weight_TK)


class SwitchRouter(nn.Module):
    """Switch routing (Fedus et al. 2021): top-1, weight = the chosen expert's softmax probability.

    ``jitter = eps``: in training the router input is multiplied by noise uniform in
    ``[1 - eps, 1 + eps]`` (the paper's multiplicative jitter); 0 disables it.
    """

    def __init__(self, d_model: int, num_experts: int, jitter: float = 0.0) -> None:
        super().__init__()
        check_positive_int(d_model, "d_model")
        check_positive_int(num_experts, "num_experts")
        check_float(jitter, "jitter", low_open=False, high=1.0)
        self.d_model, self.num_experts, self.top_k = d_model, num_experts, 1
        self.jitter = float(jitter)
        self.gate = new_gate(d_model, num_experts)

    def forward(self, x: Tensor, *, token_ids_T: Tensor | None = None) -> Routing:
        x_TD = flatten_tokens(x, self.d_model, "SwitchRouter").float()
        if self.training and self.jitter > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits_TE = gate_logits(self.gate, x_TD)
        probs_TE = logits_TE.softmax(-1)
        weight_T1, index_T1 = probs_TE.max(-1, keepdim=True)
        return Routing(
            probs_TE, logits_TE, expert_indices_TK=index_T1, combine_weights_TK=weight_T1
        )


class HierarchicalRouter(nn.Module):
    """Two-level gating (Shazeer et al. 2017, hierarchical MoE): groups, then experts in a group.

    The E experts form G groups of M = E / G consecutive experts (group g holds experts
    ``g*M .. g*M+M-1``). A group gate gives ``p(g)``; an expert gate (one ``D x E`` matmul, softmax
    within each group) gives ``p(e | g)``. Each token takes its ``top_k_groups`` groups and, inside
    each, its ``top_k_experts`` experts: K = top_k_groups * top_k_experts, slots sorted by weight.
    Weights are ``p(g) * p(e | g)`` *renormalized over the K chosen experts*, so every token's
    weights sum to 1 (with one group and one expert the weight is 1). ``probs_TE[t, e] =
    p(g(e)) * p(e | g(e))`` over all E (sums to 1). ``logits_TE[t, e] = a_g(e) + b_e`` (group
    logit plus expert logit): its logsumexp penalizes the scale of both gates in the z-loss.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        num_groups: int,
        top_k_groups: int = 1,
        top_k_experts: int = 1,
    ) -> None:
        super().__init__()
        check_positive_int(d_model, "d_model")
        check_positive_int(num_experts, "num_experts")
        check_positive_int(num_groups, "num_groups", maximum=num_experts)
        if num_experts % num_groups:
            divisors = [g for g in range(1, num_experts + 1) if num_experts % g == 0]
            raise ValueError(
                f"num_groups must divide num_experts={num_experts}, got {num_groups}; "
                f"allowed: {divisors}"
            )
        per_group = num_experts // num_groups
        check_positive_int(top_k_groups, "top_k_groups", maximum=num_groups)
        check_positive_int(top_k_experts, "top_k_experts", maximum=per_group)
        self.d_model, self.num_experts = d_model, num_experts
        self.num_groups, self.experts_per_group = num_groups, per_group
        self.top_k_groups, self.top_k_experts = top_k_groups, top_k_experts
        self.top_k = top_k_groups * top_k_experts
        self.group_gate = new_gate(d_model, num_groups)
        self.expert_gate = new_gate(d_model, num_experts)

    def forward(self, x: Tensor, *, token_ids_T: Tensor | None = None) -> Routing:
        x_TD = flatten_tokens(x, self.d_model, "HierarchicalRouter")
        G, M = self.num_groups, self.experts_per_group
        group_logits_TG = gate_logits(self.group_gate, x_TD)
        expert_logits_TGM = gate_logits(self.expert_gate, x_TD).view(-1, G, M)
        T = x_TD.shape[0]
        p_group_TG = group_logits_TG.softmax(-1)
        p_expert_TGM = expert_logits_TGM.softmax(-1)
        probs_TE = (p_group_TG[:, :, None] * p_expert_TGM).reshape(T, G * M)
        logits_TE = (group_logits_TG[:, :, None] + expert_logits_TGM).reshape(T, G * M)

        group_Tg = group_logits_TG.topk(self.top_k_groups, dim=-1).indices  # g: chosen groups
        gather_TgM = group_Tg[:, :, None].expand(-1, -1, M)
        chosen_logits_TgM = expert_logits_TGM.gather(1, gather_TgM)
        member_Tgm = chosen_logits_TgM.topk(self.top_k_experts, dim=-1).indices  # m: chosen members
        expert_TK = (group_Tg[:, :, None] * M + member_Tgm).reshape(T, self.top_k)
        weight_TK = probs_TE.gather(1, expert_TK)
        weight_TK = weight_TK / weight_TK.sum(-1, keepdim=True)
        weight_TK, order_TK = weight_TK.sort(-1, descending=True)
        expert_TK = expert_TK.gather(1, order_TK)
        return Routing(
            probs_TE, logits_TE, expert_indices_TK=expert_TK, combine_weights_TK=weight_TK
        )


class HashRouter(nn.Module):
    """Hash layer routing (Roller et al. 2021): a fixed random table token id -> expert, K = 1.

    The table deals a seeded random permutation of the ``vocab_size`` ids round-robin over the
    experts, so every expert owns ``vocab_size / E`` ids (+-1). It is a buffer (saved in the
    state dict), not a parameter: nothing is learned. Weights are 1.0, ``probs_TE`` is one-hot,
    ``logits_TE`` is None. ``forward`` needs ``token_ids_T``: int ids in ``[0, vocab_size)``, shaped
    like ``x``'s leading dims or flat ``(T,)``.
    """

    def __init__(self, d_model: int, num_experts: int, vocab_size: int, seed: int = 0) -> None:
        super().__init__()
        check_positive_int(d_model, "d_model")
        check_positive_int(num_experts, "num_experts")
        check_positive_int(vocab_size, "vocab_size")
        check_positive_int(seed, "seed", minimum=0)
        self.d_model, self.num_experts, self.top_k = d_model, num_experts, 1
        self.vocab_size = vocab_size
        generator = torch.Generator().manual_seed(seed)
        permutation = torch.randperm(vocab_size, generator=generator)
        table_V = torch.empty(vocab_size, dtype=torch.int64)
        table_V[permutation] = torch.arange(vocab_size) % num_experts
        self.register_buffer("table_V", table_V)

    def forward(self, x: Tensor, *, token_ids_T: Tensor | None = None) -> Routing:
        x_TD = flatten_tokens(x, self.d_model, "HashRouter")
        T = x_TD.shape[0]
        if token_ids_T is None:
            raise ValueError(
                "HashRouter: token_ids_T is required (the token ids to hash, shaped like x's "
                "leading dims); pass token_ids=... to the MoE layer"
            )
        if (
            not isinstance(token_ids_T, Tensor)
            or token_ids_T.is_floating_point()
            or token_ids_T.is_complex()
            or token_ids_T.dtype == torch.bool
            or token_ids_T.shape not in (x.shape[:-1], (T,))
        ):
            raise ValueError(
                f"HashRouter: token_ids_T must be an integer tensor shaped like x's leading dims "
                f"{tuple(x.shape[:-1])} or ({T},), got {describe_tensor(token_ids_T)}"
            )
        ids_T = token_ids_T.reshape(T).to(device=self.table_V.device, dtype=torch.int64)
        if T and bool(((ids_T < 0) | (ids_T >= self.vocab_size)).any()):
            raise ValueError(
                f"HashRouter: token ids must be in [0, vocab_size={self.vocab_size}), got min "
                f"{int(ids_T.min())}, max {int(ids_T.max())}"
            )
        index_T1 = self.table_V[ids_T][:, None]
        probs_TE = F.one_hot(index_T1[:, 0], self.num_experts).float()
        weight_T1 = torch.ones(T, 1, device=index_T1.device)
        return Routing(probs_TE, None, expert_indices_TK=index_T1, combine_weights_TK=weight_T1)


ROUTERS: dict[str, type[nn.Module]] = {
    "softmax": SoftmaxRouter,
    "gumbel": GumbelRouter,
    "topk": TopKRouter,
    "switch": SwitchRouter,
    "expert_choice": ExpertChoiceRouter,
    "hierarchical": HierarchicalRouter,
    "hash": HashRouter,
}
