"""Translation app: an expert-routed encoder-decoder Transformer on Multi30k (Elliott et al. 2016),
scored with sacreBLEU (Post 2018); `moe-apps translation train / eval / translate`.

Modules: `config` (frozen configs, presets), `vocab` (the shared sentencepiece vocabulary), `data`
(token-count batches with length bucketing), `model` (`build_model`), `decode` (greedy and beam
search with cached keys/values), `task` (label-smoothed loss for the shared loop), `train` (training
on the run lifecycle, the routing report), `inference` (best or averaged weights, translation,
sacreBLEU scores, the experts of each token), `plots` (expert load per layer), `cli` (the Typer
sub-app).
"""
