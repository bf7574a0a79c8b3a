"""moe_core: Mixture-of-Experts building blocks for PyTorch (torch only).

Routers return a `Routing`; experts compute slots grouped by expert; `MoE` wires router + experts (+
shared experts) through the sorted dispatch and returns a `MoEOutput` with aux losses and routing
stats. Multi-gate layers (MMoE, PLE) and Soft-MoE sit beside it; `ExpertParallelMoE` splits a layer's
experts over a torch.distributed group. See docs/ARCHITECTURE.md.
"""

from moe_core.diagnostics import RoutingStats, StatsAccumulator, routing_stats
from moe_core.expert_choice import ExpertChoiceRouter
from moe_core.expert_parallel import ExpertParallelMoE, to_expert_parallel
from moe_core.expert_parallel_state import full_state_dict, load_full_state_dict
from moe_core.experts import EXPERTS, FFN, ConvExperts, ExpertBank, ModuleExperts
from moe_core.layer import MoE, MoEOutput, MoETensor
from moe_core.losses import (
    collect_aux_losses,
    importance_loss,
    load_balancing_loss,
    router_z_loss,
    weighted_aux_loss,
)
from moe_core.multigate import CGC, PLE, MMoE, MultiGateOutput
from moe_core.routers import (
    ROUTERS,
    GumbelRouter,
    HashRouter,
    HierarchicalRouter,
    SoftmaxRouter,
    SwitchRouter,
    TopKRouter,
)
from moe_core.routing import Routing
from moe_core.shared_core import SharedCore
from moe_core.soft_moe import SoftMoE

__version__ = "0.1.0"

__all__ = [
    "CGC",
    "EXPERTS",
    "FFN",
    "MMoE",
    "PLE",
    "ROUTERS",
    "ConvExperts",
    "ExpertBank",
    "ExpertChoiceRouter",
    "ExpertParallelMoE",
    "GumbelRouter",
    "HashRouter",
    "HierarchicalRouter",
    "MoE",
    "MoEOutput",
    "MoETensor",
    "ModuleExperts",
    "MultiGateOutput",
    "Routing",
    "RoutingStats",
    "SharedCore",
    "SoftMoE",
    "SoftmaxRouter",
    "StatsAccumulator",
    "SwitchRouter",
    "TopKRouter",
    "collect_aux_losses",
    "full_state_dict",
    "importance_loss",
    "load_balancing_loss",
    "load_full_state_dict",
    "routing_stats",
    "router_z_loss",
    "to_expert_parallel",
    "weighted_aux_loss",
]
