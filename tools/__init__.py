"""Optional tools beside the reference: the run plumbing of train_shakespeare.py (runs, monitors, cpu_rmsnorm),
the compare runner and learning-rate sweep (python -m tools.sweep), plots (python -m tools.plots) and the
step-time benchmark (python -m tools.bench)."""
