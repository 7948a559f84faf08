"""``hydra/sweeper=ldm_optuna``: Optuna studies for train.py, resumable, with pruning (see ``sweeper.py``)."""
