"""Configuration of the vision app: `ModelConfig` (which network), `RecipeConfig` (how it trains,
the airbench94 recipe of Keller Jordan 2024 re-derived for a mean-reduced loss), `VisionConfig`
(both plus the data choices), the two presets and the checks that refuse an impossible config
before any work starts.

Configs are frozen dataclasses; presets are plain functions in the `PRESETS` registry.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

MODELS = ("moe", "condconv", "dense", "dense-wide")
ROUTERS = ("topk", "gumbel")  # moe's gate: `moe_apps.vision.model.ROUTER_BUILDERS` builds each
STAGES = 3  # the backbone's three conv groups, counted from 0


def _int(value: object, name: str, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (
            maximum is not None and value > maximum):
        allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be an int {allowed}, got {value!r}")


def _positive(value: object, name: str, *, zero_ok: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value >= 0 if zero_ok else value > 0) and value == value and value != float("inf")
    if not ok:
        raise ValueError(f"{name} must be a finite number {'>= 0' if zero_ok else '> 0'}, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """The network: an airbench94-style backbone (whitening conv, three conv groups, linear head).

    Attributes:
        model: "moe" (routed conv-group experts), "condconv" (per-image mixture of kernels),
            "dense" (no experts, FLOPs per image equal to moe's), "dense-wide" (no experts,
            parameter count equal to moe's).
        widths: output channels of the three conv groups.
        expert_stages: which conv groups (0, 1, 2) hold experts (moe, condconv); for dense and
            dense-wide these are the groups whose width is solved for. (2,) by measurement: on
            the ``tune`` preset's validation slice (12 epochs, seed 0) stage 2 reached 93.96%,
            stage 1 93.04%, stages 1 and 2 92.66% (docs/BENCHMARKS.md, Vision).
        num_experts: E. 2 by measurement: at 4 epochs (seed 0, default recipe) E = 2 reached
            90.89% test against dense's 90.94% and E = 4's 87.79% (each expert of E sees ~1/E
            of the images, and at this budget the data per expert, not capacity, limits it).
        top_k: experts per image (moe; checked to be in 1..E for every model).
        bn_momentum: airbench's 0.6 = weight of the old running statistic.
        expert_core: moe only, off by default: the experts' conv kernels read a shared core plus
            a per-expert residual (`moe_core.shared_core.SharedCore`, after RMoE): the core learns
            from every image, a residual from its expert's images; the same compute per image,
            E + 1 kernels stored for E. On the ``tune`` preset's validation slice (12 epochs, seeds
            0 / 1) 93.22% / 94.32% against 93.64% / 93.96% without it: no choice (docs/BENCHMARKS.md).
        expert_width: moe only: the inner width of each expert group (its first conv's output);
            None = the stage's width. Narrow experts at a larger top-k are DeepSeekMoE's
            fine-grained experts: E = 4 of width 128 at k = 2 cost what E = 2 of width 256 cost
            at k = 1 (FLOPs and parameters); the dense twins are solved against that cost. On the
            ``tune`` preset's validation slice (12 epochs, seeds 0 / 1) 93.64% / 93.98% against
            93.96% / 94.14%, and E = 3 of width 128 at k = 2 (each expert sees 2/3 of the images)
            93.92% / 94.12%: a tie, no choice (docs/BENCHMARKS.md, Vision).
        router: moe only: "topk" (the default: the top-k probabilities over their detached sum)
            or "gumbel" (k = 1: hard Gumbel-softmax, the expert sampled from the gate's softmax
            while training, the argmax at eval, straight-through gradient; Jang et al. 2017). On
            the ``tune`` preset's validation slice (12 epochs, seed 0) 93.74% against the
            default's 93.96%: not chosen (docs/BENCHMARKS.md, Vision).
    """

    model: str = "moe"
    widths: tuple[int, int, int] = (64, 256, 256)
    expert_stages: tuple[int, ...] = (2,)
    num_experts: int = 2
    top_k: int = 1
    bn_momentum: float = 0.6
    whitening_width: int = 24  # 2 x the 12 eigen-patches of a 2x2x3 patch
    logit_scale: float = 1 / 9
    expert_core: bool = False
    expert_width: int | None = None
    router: str = "topk"

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {', '.join(MODELS)}, got {self.model!r}")
        if len(self.widths) != STAGES:
            raise ValueError(f"widths must be {STAGES} ints, got {self.widths!r}")
        for width in self.widths:
            _int(width, "every width", 1)
        if not self.expert_stages or len(set(self.expert_stages)) != len(self.expert_stages):
            raise ValueError(f"expert_stages must be distinct stage numbers in 0..{STAGES - 1}, "
                             f"got {self.expert_stages!r}")
        for stage in self.expert_stages:
            _int(stage, "every expert stage", 0, STAGES - 1)
        _int(self.num_experts, "num_experts (--num-experts)", 1)
        # every model: dense variants are solved against moe, and condconv (which mixes all E
        # kernels) must not take an impossible --top-k in silence
        _int(self.top_k, "top_k (--top-k)", 1)
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k (--top-k) = {self.top_k} cannot exceed num_experts "
                             f"(--num-experts) = {self.num_experts}; lower --top-k or add experts")
        if not 0 <= self.bn_momentum < 1:
            raise ValueError(f"bn_momentum must be in [0, 1), got {self.bn_momentum!r}")
        _int(self.whitening_width, "whitening_width", 2)
        if self.whitening_width % 2:
            raise ValueError(f"whitening_width must be even (+- filter pairs), got {self.whitening_width}")
        _positive(self.logit_scale, "logit_scale")
        if not isinstance(self.expert_core, bool):
            raise ValueError(f"expert_core must be true or false, got {self.expert_core!r}")
        if self.expert_width is not None:
            _int(self.expert_width, "expert_width", 1)
            if self.model == "condconv":
                raise ValueError("expert_width applies to moe (and the dense twins solved against "
                                 "it), not condconv; leave it unset for condconv")
        if self.router not in ROUTERS:
            raise ValueError(f"router (--router) must be one of {', '.join(ROUTERS)}, got {self.router!r}")
        if self.router == "gumbel" and self.top_k != 1:
            raise ValueError(f"router gumbel routes each image to one expert; it needs top_k "
                             f"(--top-k) = 1, got {self.top_k}")


@dataclass(frozen=True)
class RecipeConfig:
    """The training recipe (airbench94, for a loss averaged over the batch).

    Airbench sums the loss over a batch of 1024 and uses SGD lr 11.5 / 7850.7 (momentum 0.85,
    nesterov); with the mean loss that is lr 1.5. Its weight decay shrinks the weights by
    0.0153 x 1024 / 7850.7 per step: torch's L2 coefficient wd / lr = 0.0153 x 1024 / 11.5 on the
    summed loss, so ``weight_decay`` = 0.0153 / 11.5 ~= 1.33e-3 on the mean loss. (Runs before
    2026-11-30 03:14 UTC used 0.0153 / 7850.7, ~680x weaker; on seed 0 the fix took dense from
    92.09% to 93.80% and moe from 90.59% to 91.53%: docs/BENCHMARKS.md, Vision.) Norm biases take
    ``bias_lr_scale`` x the lr and 1 / that of the L2 coefficient; router gates
    ``router_lr_scale`` x the lr, no L2: 0.1, chosen on the ``tune`` preset's validation slice (12
    epochs, seeds 0 / 1: 93.96% / 94.14% against 93.64% / 93.96% at the earlier 0.02; test accuracy
    over seeds 0-2 94.29 +- 0.16% against 94.08 +- 0.04%; docs/BENCHMARKS.md, Vision; saved runs
    keep the value they trained with). ``router_input_grad`` (off by default): whether the router's
    losses (balance, z) and the gate's task gradient also reach the groups before the expert
    stage through the router's input; off, they train the gate alone. Measured (default recipe at
    10 epochs, seeds 0-2, two threads): moe 93.61% -> 93.73% test accuracy with it off, higher on every
    seed, and a lower training loss from the second epoch on; on the ``tune`` preset's validation
    slice (12 epochs, seeds 0 and 1) 93.64% / 93.96% against 92.56% / 94.06% with the gradient
    (docs/BENCHMARKS.md, Vision).
    The schedule is triangular: ``start`` x lr at step 0, 1 x at ``peak`` of the run, ``end`` x at the
    end. Lookahead (hlb-CIFAR10, airbench): every ``lookahead_every`` steps the average moves toward
    the weights, ``avg = d * avg + (1 - d) * w`` with ``d = lookahead_decay``, and the weights are
    reset to it, over the last 30% of the epochs (airbench ramps d up to 0.77 with the cube of the
    progress, so it acts late; 0.5 is about its mean over that last part). 0 steps = off.
    """

    epochs: int = 12
    batch_size: int = 1024
    eval_batch_size: int = 2000
    lr: float = 1.5
    momentum: float = 0.85
    weight_decay: float = 0.0153 / 11.5
    bias_lr_scale: float = 64.0
    router_lr_scale: float = 0.1
    label_smoothing: float = 0.2
    schedule_start: float = 0.2
    schedule_peak: float = 0.23
    schedule_end: float = 0.07
    lookahead_every: int = 5
    lookahead_decay: float = 0.5
    translate: int = 2
    tta: bool = True
    aux_load_balance: float = 0.01
    aux_z_loss: float = 0.001
    router_input_grad: bool = False
    precision: str = "bf16"
    channels_last: bool = True

    def __post_init__(self) -> None:
        _int(self.epochs, "epochs (--epochs)", 1)
        _int(self.batch_size, "batch_size", 1)
        _int(self.eval_batch_size, "eval_batch_size", 1)
        for name in ("lr", "bias_lr_scale", "router_lr_scale"):
            _positive(getattr(self, name), name)
        for name in ("weight_decay", "aux_load_balance", "aux_z_loss"):
            _positive(getattr(self, name), name, zero_ok=True)
        for name in ("momentum", "label_smoothing", "lookahead_decay"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        for name in ("schedule_start", "schedule_end"):
            _positive(getattr(self, name), name, zero_ok=True)
        if not 0 < self.schedule_peak < 1:
            raise ValueError(f"schedule_peak must be in (0, 1), got {self.schedule_peak!r}")
        _int(self.lookahead_every, "lookahead_every", 0)
        _int(self.translate, "translate", 0, 8)
        for name in ("router_input_grad", "tta", "channels_last"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"precision (--precision) must be 'bf16' or 'fp32', got {self.precision!r}")


@dataclass(frozen=True)
class VisionConfig:
    """One run: model, recipe and data.

    Attributes:
        validation: images held out of the 50,000 training images for validation (tuning); 0 trains
            on all of them and validates on the test set only for the per-epoch log (never for
            choices).
        train_limit: use only the first this many training images (tests); None = all.
        test_limit: score only the first this many test images (tests); None = all 10,000.
        seed: seeds the validation split, the data order, augmentation and initialisation.
        device: "auto" | "cpu" | "cuda" | "cuda:N".
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    validation: int = 5000
    train_limit: int | None = None
    test_limit: int | None = None
    seed: int = 0
    device: str = "auto"
    preset: str = "default"

    def __post_init__(self) -> None:
        _int(self.validation, "validation", 0)
        if self.train_limit is not None:
            _int(self.train_limit, "train_limit", 2)
            if self.validation >= self.train_limit:
                raise ValueError(f"validation ({self.validation}) must be smaller than train_limit "
                                 f"({self.train_limit})")
        if self.test_limit is not None:
            _int(self.test_limit, "test_limit", 1)
        _int(self.seed, "seed (--seed)", 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> VisionConfig:
        """The inverse of `to_dict` (JSON lists back to tuples); anything that does not make a
        valid config (unknown keys at any level, a part that is not an object, a value of the
        wrong type or range) is a ValueError. A saved recipe without ``router_input_grad`` was
        written before the option existed, when the gradient always flowed: it resumes that way."""
        top = _object(raw, cls, "vision config")
        model = _object(top.pop("model", {}), ModelConfig, "vision config 'model'")
        recipe = _object(top.pop("recipe", {}), RecipeConfig, "vision config 'recipe'")
        if recipe:
            recipe.setdefault("router_input_grad", True)
        for key in ("widths", "expert_stages"):
            if isinstance(model.get(key), list):
                model[key] = tuple(model[key])
        try:
            return cls(model=ModelConfig(**model), recipe=RecipeConfig(**recipe), **top)
        except TypeError as error:  # e.g. a number where a list belongs
            raise ValueError(f"invalid vision config ({error})") from error


def _object(value: Any, kind: type, name: str) -> dict[str, Any]:
    """A copy of ``value`` if it is a dict with only ``kind``'s field names, else ValueError."""
    if not isinstance(value, dict):
        raise ValueError(f"a {name} must be a JSON object, got {type(value).__name__}")
    unknown = sorted(map(str, set(value) - {f.name for f in fields(kind)}))
    if unknown:
        raise ValueError(f"unknown {name} keys: {', '.join(unknown)}")
    return dict(value)


def default_preset() -> VisionConfig:
    """The full run: all 50,000 training images after tuning on a 5,000-image validation slice;
    12 epochs (airbench94 uses 9.9): moe (E = 2) trains at about 62 s per epoch on two idle
    cores, 745-756 s for the 12 epochs, inside the 15-minute budget when nothing else runs.
    10 epochs gave moe 93.73 +- 0.13% test accuracy over seeds 0-2, 12 epochs 94.08 +- 0.04%
    (docs/BENCHMARKS.md, Vision)."""
    return VisionConfig(validation=0, preset="default")


def tune_preset() -> VisionConfig:
    """Tuning: 45,000 training images, 5,000 held out for validation."""
    return VisionConfig(validation=5000, preset="tune")


def smoke_preset() -> VisionConfig:
    """Seconds on two cores (tests): 700 training images (100 for validation), 2 epochs of 6
    steps, a narrow backbone, 500 test images."""
    return VisionConfig(
        model=ModelConfig(widths=(16, 32, 32)),
        recipe=RecipeConfig(epochs=2, batch_size=100, eval_batch_size=500, lookahead_every=2),
        validation=100, train_limit=700, test_limit=500, preset="smoke",
    )


PRESETS = {"default": default_preset, "tune": tune_preset, "smoke": smoke_preset}


def get_preset(name: str) -> VisionConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()


def with_overrides(config: VisionConfig, *, model: str | None = None, num_experts: int | None = None,
                   top_k: int | None = None, expert_width: int | None = None, router: str | None = None,
                   epochs: int | None = None,
                   seed: int | None = None, device: str | None = None,
                   precision: str | None = None) -> VisionConfig:
    """``config`` with the CLI's overrides (None = keep); every check runs again."""
    model_cfg = config.model
    changes = {k: v for k, v in (("model", model), ("num_experts", num_experts), ("top_k", top_k),
                                 ("expert_width", expert_width), ("router", router)) if v is not None}
    if changes:
        model_cfg = replace(model_cfg, **changes)
    recipe_changes = {k: v for k, v in (("epochs", epochs), ("precision", precision)) if v is not None}
    recipe = replace(config.recipe, **recipe_changes) if recipe_changes else config.recipe
    top = {k: v for k, v in (("seed", seed), ("device", device)) if v is not None}
    return replace(config, model=model_cfg, recipe=recipe, **top)
