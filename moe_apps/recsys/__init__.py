"""Multi-task recommendation on MovieLens with multi-gate mixtures of experts (MMoE, Ma et al. 2018;
PLE, Tang et al. 2020): config (tasks, presets), data (protocols, torchrec batches), model (one
`build_model`), task (loss and metrics), train (train / eval / recommend), plots, cli; splits
(protocol parts, the recbole split), implicit (sampled unrated movies), ranking (full-ranking
top-K metrics), export (torch.export serving model)."""

import logging

# Importing torchrec calls torch.fx's is_fx_tracing(), which logs a deprecation warning on every run
# of every command; it is about torch internals, nothing a user can act on.
logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
