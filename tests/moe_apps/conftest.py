"""Makes this folder's shared test helpers (`training_problem`, `run_faults`) importable from the
app test folders below it (pytest puts a conftest's folder on sys.path)."""
