"""Evaluators chosen by name in the config (``eval.evaluators``) and the one preparation of an evaluation.

This package imports its own evaluators: ``zeroshot``, ``retrieval`` (:mod:`.zeroshot`), ``classification``,
``classification_hflip``, ``linear_probe`` (:mod:`.probe`), ``coco`` (:mod:`.coco`). A new one is a function
decorated with :func:`register_evaluator` in a module imported here (or in the user's own code before the run).
"""

from mm_ptft.eval import coco, probe, zeroshot  # noqa: F401 - register the evaluators
from mm_ptft.eval.base import (
    EVALUATORS,
    Classifier,
    Detector,
    EvalContext,
    Evaluator,
    FeatureExtractor,
    ImageClassifier,
    ImageTextEncoder,
    register_evaluator,
    run_evaluators,
)
from mm_ptft.eval.prepare import (
    EvalPlan,
    clip_benchmark_filename,
    clip_benchmark_records,
    evaluate_model,
    plan_eval,
    plan_evals,
)

__all__ = [
    "EVALUATORS",
    "Classifier",
    "Detector",
    "EvalContext",
    "EvalPlan",
    "Evaluator",
    "FeatureExtractor",
    "ImageClassifier",
    "ImageTextEncoder",
    "clip_benchmark_filename",
    "clip_benchmark_records",
    "evaluate_model",
    "plan_eval",
    "plan_evals",
    "register_evaluator",
    "run_evaluators",
]
