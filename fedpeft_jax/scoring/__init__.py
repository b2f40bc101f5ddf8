"""Scoring a model, apart from any federated machinery: the examples' form (`InputSpec`),
the training loss (`masked_cross_entropy`) and the evaluator (`make_evaluate`). Central
pre-training and the federated engine both use it; it imports nothing of the engine."""

from fedpeft_jax.scoring.evaluate import make_evaluate, place_eval_set, scored_sums
from fedpeft_jax.scoring.inputs import KINDS, InputSpec, images_input
from fedpeft_jax.scoring.loss import masked_cross_entropy

__all__ = ["KINDS", "InputSpec", "images_input", "make_evaluate", "masked_cross_entropy",
           "place_eval_set", "scored_sums"]
