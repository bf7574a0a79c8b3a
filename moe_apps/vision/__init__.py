"""The vision app: CIFAR-10 classification with conv experts on an airbench94-style backbone.

Modules: `config` (configs, presets), `data` (splits, batches, augmentation, image files), `model`
(`build_model`: moe / condconv / dense / dense-wide, FLOPs), `task` (loss, metrics, TTA),
`train` (train / eval / predict), `plots` (eval pictures), `cli` (`moe-apps vision`).
"""
