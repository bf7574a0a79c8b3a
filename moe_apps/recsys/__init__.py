"""Multi-task recommendation on MovieLens with multi-gate mixtures of experts (MMoE, Ma et al. 2018;
PLE, Tang et al. 2020): config (tasks, presets), data (protocols, torchrec batches), model (one
`build_model`), task (loss and metrics), train (train / eval / recommend), plots, cli."""
