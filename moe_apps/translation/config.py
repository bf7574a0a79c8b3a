"""Configs of the translation app: the network, the data recipe, the decoding, and the presets.

An encoder-decoder Transformer (Vaswani et al. 2017) in the pre-LayerNorm arrangement (Xiong et al.
2020) whose feed-forward blocks are `moe_core` MoE layers (GShard / Switch style, Lepikhin et al.
2020, Fedus et al. 2021), trained on Multi30k task 1 (Elliott et al. 2016).

Everything is a frozen dataclass; presets are plain functions in the one `PRESETS` dict. The
dense twin (``model="dense"``) has the same active feed-forward FLOPs per token as the MoE model:
its hidden width is ``active_experts * expert_hidden`` (`ModelConfig.dense_hidden`), where
``active_experts`` is K for top-k, 1 for Switch and hash routing, the capacity factor for expert
choice, plus one for a shared expert. The router's ``D x E`` product (2 * 256 * 8 FLOPs per token,
under 1% of the feed-forward block) is the only extra work of the MoE model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from moe_apps.training import TrainConfig
from moe_core.checks import check_positive_int

MODELS = ("moe", "dense")
ROUTER_NAMES = ("topk", "switch", "hash", "expert-choice")
DIRECTIONS = ("de-en", "en-de")
ACTIVATIONS = ("relu", "gelu", "swiglu")
EXPERT_KERNELS = ("auto", "loop", "bucketed", "grouped")


def _check_fraction(value: float, name: str) -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """The network.

    Attributes:
        model: "moe" (MoE feed-forward blocks) | "dense" (the twin with the same active FLOPs).
        vocab_size: size of the shared source/target subword vocabulary (learned on the training
            split; includes the 4 special ids and sentencepiece's 256 byte-fallback pieces).
        d_model, num_heads: Transformer width and attention heads.
        encoder_layers, decoder_layers: depths.
        num_experts, top_k: experts per MoE layer, experts per token (top-k router).
        router: "topk" | "switch" (top-1) | "hash" (by token id) | "expert-choice" (encoder
            only: the decoder's MoE layers then use top-k token choice, since expert choice looks
            at future tokens).
        expert_hidden: hidden width H of one expert.
        shared_expert: add one always-on expert of width H (DeepSeekMoE).
        moe_every: 1 = every layer's FFN is MoE, 2 = every other layer (layers 1, 3, ...), the rest dense
            with ``dense_hidden``.
        capacity_factor: training capacity of the encoder's token-choice layers (None =
            dropless); inference and the decoder are always dropless. For expert choice it is the
            experts-per-token factor (default: ``top_k``).
        dropout: on attention weights, residual branches and embeddings.
        activation: of the experts and the dense FFN.
        expert_kernel: `moe_core.ExpertBank` ``method``; "bucketed" measured fastest on these 2
            cores for this layer size (docs/BENCHMARKS.md, Translation).
        max_source_tokens: longer source lines are truncated to this many subwords (with a
            warning in `translate` / `eval`; training pairs longer than it are skipped).
    """

    model: str = "moe"
    vocab_size: int = 8000
    d_model: int = 256
    num_heads: int = 4
    encoder_layers: int = 3
    decoder_layers: int = 3
    num_experts: int = 8
    top_k: int = 2
    router: str = "topk"
    expert_hidden: int = 512
    shared_expert: bool = False
    moe_every: int = 1
    capacity_factor: float | None = None
    dropout: float = 0.1
    activation: str = "relu"
    expert_kernel: str = "bucketed"
    max_source_tokens: int = 200

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.router not in ROUTER_NAMES:
            raise ValueError(f"router must be one of {ROUTER_NAMES}, got {self.router!r}")
        if self.expert_kernel not in EXPERT_KERNELS:
            raise ValueError(f"expert_kernel must be one of {EXPERT_KERNELS}, got {self.expert_kernel!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        for name in ("vocab_size", "d_model", "num_heads", "encoder_layers", "decoder_layers",
                     "num_experts", "top_k", "expert_hidden", "moe_every", "max_source_tokens"):
            check_positive_int(getattr(self, name), name)
        if self.vocab_size < 300:
            raise ValueError(f"vocab_size must be >= 300 (256 byte pieces + specials + characters), "
                             f"got {self.vocab_size}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by num_heads={self.num_heads}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be <= num_experts={self.num_experts}")
        if self.moe_every not in (1, 2):
            raise ValueError(f"moe_every must be 1 (every layer) or 2 (every other layer), got {self.moe_every}")
        if self.capacity_factor is not None and not (
            isinstance(self.capacity_factor, (int, float)) and math.isfinite(self.capacity_factor)
            and self.capacity_factor > 0
        ):
            raise ValueError(f"capacity_factor must be > 0 or None (dropless), got {self.capacity_factor!r}")
        _check_fraction(self.dropout, "dropout")

    @property
    def active_experts(self) -> float:
        """Experts' worth of FFN work each token gets in an encoder MoE layer."""
        routed = {"topk": self.top_k, "switch": 1, "hash": 1,
                  "expert-choice": self.capacity_factor or self.top_k}[self.router]
        return routed + (1 if self.shared_expert else 0)

    @property
    def dense_hidden(self) -> int:
        """Hidden width of a dense FFN with the active FLOPs of one MoE layer (K x H)."""
        return int(round(self.active_experts * self.expert_hidden))

    def is_moe_layer(self, index: int) -> bool:
        """Whether layer ``index`` (0-based, in its stack) has an MoE feed-forward block."""
        return self.model == "moe" and (self.moe_every == 1 or index % 2 == 1)


@dataclass(frozen=True)
class DataConfig:
    """What is read and how it is batched.

    Attributes:
        direction: "de-en" (German source) | "en-de".
        batch_tokens: padded tokens per batch, ``sentences * max(source, target length)``
            (length bucketing keeps the padding small).
        updates_per_epoch: optimizer steps between two validations (an "epoch" of the loop is
            this many batches of an endless stream of shuffled passes over the data), so that a
            run is a fixed number of updates: ``train.epochs * updates_per_epoch``. Under torchrun
            (``--nproc N``) the N processes share each epoch's batches: updates_per_epoch / N
            optimizer steps, each on N batches (the same data per epoch, an N x larger batch).
        train_limit: use only the first N training pairs (None = all): for the smoke preset.
        val_limit: validate on the first N validation pairs (None = all 1,014).
    """

    direction: str = "de-en"
    batch_tokens: int = 4000
    updates_per_epoch: int = 200
    train_limit: int | None = None
    val_limit: int | None = None

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")
        check_positive_int(self.batch_tokens, "batch_tokens", minimum=16)
        check_positive_int(self.updates_per_epoch, "updates_per_epoch")
        for name in ("train_limit", "val_limit"):
            if getattr(self, name) is not None:
                check_positive_int(getattr(self, name), name)

    @property
    def languages(self) -> tuple[str, str]:
        """(source, target) language codes, e.g. ("de", "en")."""
        source, target = self.direction.split("-")
        return source, target


@dataclass(frozen=True)
class DecodeConfig:
    """How `eval` and `translate` decode: beam size, length penalty (score / length**alpha), and
    the output cap ``ceil(max_len_a * source_length) + max_len_b`` subwords."""

    beam: int = 5
    length_penalty: float = 1.0
    max_len_a: float = 1.5
    max_len_b: int = 10
    batch_sentences: int = 128

    def __post_init__(self) -> None:
        check_positive_int(self.beam, "beam")
        check_positive_int(self.batch_sentences, "batch_sentences")
        check_positive_int(self.max_len_b, "max_len_b", minimum=0)
        if not (isinstance(self.length_penalty, (int, float)) and self.length_penalty >= 0):
            raise ValueError(f"length_penalty must be >= 0, got {self.length_penalty!r}")
        if not (isinstance(self.max_len_a, (int, float)) and self.max_len_a > 0):
            raise ValueError(f"max_len_a must be > 0, got {self.max_len_a!r}")


@dataclass(frozen=True)
class TranslationConfig:
    """One run: model, data, decoding, the shared loop's `TrainConfig`, and the loss recipe.

    ``label_smoothing`` is applied by the task (`F.cross_entropy(label_smoothing=...)`); validation
    reports the plain token cross-entropy. ``preset`` names the preset it came from.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    train: TrainConfig = field(default_factory=lambda: default_train())
    label_smoothing: float = 0.1
    preset: str = "default"

    def __post_init__(self) -> None:
        _check_fraction(self.label_smoothing, "label_smoothing")
        if self.model.router == "hash" and self.model.model == "moe" and self.model.vocab_size < 2:
            raise ValueError("hash routing needs the vocabulary size")

    @property
    def total_updates(self) -> int:
        """Optimizer steps of the whole run: ``train.epochs * data.updates_per_epoch``."""
        return self.train.epochs * self.data.updates_per_epoch

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TranslationConfig:
        """Rebuild a config from `to_dict` output (as read back from config.json)."""
        def build(kind: type, values: dict[str, Any]) -> Any:
            names = {f.name for f in fields(kind)}
            unknown = sorted(set(values) - names)
            if unknown:
                raise ValueError(f"unknown {kind.__name__} fields in the saved config: {unknown}")
            values = dict(values)
            values = {k: _tuples(v) for k, v in values.items()}  # JSON lists back to tuples
            return kind(**values)

        if not isinstance(raw, dict):
            raise ValueError(f"a translation config must be a JSON object, got {type(raw).__name__}")
        parts = {"model": ModelConfig, "data": DataConfig, "decode": DecodeConfig, "train": TrainConfig}
        values = {k: (build(parts[k], v) if k in parts else v) for k, v in raw.items()}
        return build(cls, values)


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def default_train(**changes: Any) -> TrainConfig:
    """The shared loop's settings for translation: AdamW (Loshchilov & Hutter 2019) with the
    inverse-square-root schedule after a linear warm-up (Vaswani et al. 2017), bf16 autocast,
    gradient clipping at 1.0, validation loss picks the best epoch, no early stopping."""
    base = dict(epochs=20, lr=2e-3, weight_decay=0.0001, optimizer="adamw", betas=(0.9, 0.98),
                schedule="inverse_sqrt",
                warmup_steps=200, grad_clip=1.0, precision="bf16", monitor="loss",
                monitor_mode="min", patience=None, checkpoint_every=50, log_every=10,
                aux_loss_coefficients=(("load_balance", 0.01), ("z_loss", 0.001)))
    base.update(changes)
    return TrainConfig(**base)


def default_preset() -> TranslationConfig:
    """The full run: 3+3 layers, 256 wide, 8 experts top-2 (expert hidden 512, dense twin 1024),
    4,000-token batches, 4,000 updates (20 validations, one every 200 updates), sized to fit 90
    minutes on the 2 cores from the measured 1.24 s per update of the compare run, validation
    included (docs/BENCHMARKS.md, Translation). About 40 passes over the 29k training pairs, so
    dropout 0.3 (as in fairseq's small-data Transformer recipes) instead of 0.1; the last 5
    validations' weights are kept for checkpoint averaging (``eval --average``)."""
    return TranslationConfig(model=ModelConfig(dropout=0.3),
                             train=default_train(snapshots=5), preset="default")


def compare_preset() -> TranslationConfig:
    """The MoE-vs-dense comparison: the default model and recipe with 240 updates (3 x 80) and a
    100-update warm-up, about 10 minutes a model on the 2 cores (sized to the CPU time this
    session's queue had left: docs/BENCHMARKS.md, Translation)."""
    return TranslationConfig(train=default_train(epochs=3, warmup_steps=100),
                             data=DataConfig(updates_per_epoch=80), preset="compare")


def smoke_preset() -> TranslationConfig:
    """A seconds-long run on a slice of the data for tests and a first look (BLEU near zero); it
    keeps its last 2 validations' weights, so ``--average 2`` can be tried on it."""
    return TranslationConfig(
        model=ModelConfig(vocab_size=400, d_model=32, num_heads=2, encoder_layers=1,
                          decoder_layers=1, num_experts=4, expert_hidden=32, dropout=0.0,
                          max_source_tokens=64),
        data=DataConfig(batch_tokens=256, updates_per_epoch=4, train_limit=200, val_limit=20),
        decode=DecodeConfig(beam=2, batch_sentences=32),
        train=default_train(epochs=2, lr=3e-3, warmup_steps=2, checkpoint_every=2, log_every=2, snapshots=2),
        preset="smoke",
    )


PRESETS = {"default": default_preset, "compare": compare_preset, "smoke": smoke_preset}


def get_preset(name: str) -> TranslationConfig:
    """The config of preset ``name``; ValueError naming the presets otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()


def with_model(config: TranslationConfig, **changes: Any) -> TranslationConfig:
    """``config`` with model fields changed (validated)."""
    return replace(config, model=replace(config.model, **changes))
