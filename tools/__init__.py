"""Optional tools beside the reference: the run plumbing of train_shakespeare.py (runs, monitors, cli), the
compare runner and learning-rate sweep (python -m tools.sweep), plots (python -m tools.plots), the step-time
benchmark (python -m tools.bench), time to a loss against nanoGPT (python -m tools.race) and the GPU check
(python -m tools.gpu_check)."""
