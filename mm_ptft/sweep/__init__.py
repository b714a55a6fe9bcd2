"""``mm-ptft sweep``: a budgeted search over fine-tuning strategies with Optuna.

Each trial is a real run of the base fine-tuning config with the parameters TPE proposes (:mod:`.space`: dotted
config keys, ranges, conditions), started as a child process (:mod:`.trial`) and pruned on its own validation
evaluations; the study persists in SQLite and a killed sweep resumes (:mod:`.study`); the end writes the best config
as a recipe, scores the test split once for it, and tables and plots the trials (:mod:`.report`). Optuna and
matplotlib are imported only when a sweep runs.
"""

from mm_ptft.sweep.space import Param, SearchSpace, SweepError, load_space
from mm_ptft.sweep.study import SweepResult, best_config, run_sweep, score_test

__all__ = ["Param", "SearchSpace", "SweepError", "SweepResult", "best_config", "load_space", "run_sweep", "score_test"]
