"""Differential privacy: the study's mechanism, DP-SGD, DP-FedAvg, accounting, and the
run's plan (PrivacyPlan)."""

from fedpeft_jax.privacy.accounting import (ACCOUNTANTS, MECHANISMS, SAMPLINGS, PrivacyBudgetError,
                                            PrivacyLedger, calibrate_noise_multiplier,
                                            check_budget, dp_fedavg_epsilon, dp_sgd_epsilon,
                                            dp_sgd_epsilon_truncated, epsilon_of,
                                            example_uses_per_round, gaussian_epsilon,
                                            gaussian_event, make_accountant, overflow_budget,
                                            paper_gaussian_noise_multiplier,
                                            poisson_capacity_for_run,
                                            poisson_overflow_probability,
                                            sampled_gaussian_event, truncation_delta)
from fedpeft_jax.privacy.config import (default_privacy_config, paper_sigma_from_config,
                                        privacy_metadata, resolve_noise_multiplier,
                                        validate_privacy)
from fedpeft_jax.privacy.mechanisms import (SECURE_DRAWS, adaptive_clip_update, add_gaussian_noise,
                                            standard_normal,
                                            clip_per_example, clip_per_tensor, clip_stats,
                                            clip_update, default_count_stddev, dp_sgd_grad,
                                            masked_sum, noisy_sum, noisy_unclipped_fraction,
                                            paper_gaussian, paper_sigma, poisson_batch,
                                            poisson_capacity, poisson_schedule,
                                            value_noise_multiplier)
from fedpeft_jax.privacy.plan import NON_PRIVATE_METRICS, PrivacyPlan
from fedpeft_jax.privacy.dp_specs import ClientDP, ServerDP

__all__ = [
    "ACCOUNTANTS", "MECHANISMS", "SAMPLINGS", "PrivacyBudgetError", "PrivacyLedger",
    "calibrate_noise_multiplier", "check_budget", "dp_fedavg_epsilon", "dp_sgd_epsilon",
    "dp_sgd_epsilon_truncated", "epsilon_of", "example_uses_per_round", "gaussian_epsilon",
    "gaussian_event", "make_accountant", "overflow_budget", "paper_gaussian_noise_multiplier",
    "poisson_capacity_for_run", "poisson_overflow_probability", "sampled_gaussian_event",
    "truncation_delta", "default_privacy_config",
    "paper_sigma_from_config", "privacy_metadata", "resolve_noise_multiplier", "validate_privacy",
    "SECURE_DRAWS", "standard_normal", "adaptive_clip_update", "add_gaussian_noise", "clip_per_example", "clip_per_tensor",
    "clip_stats", "clip_update", "default_count_stddev", "dp_sgd_grad", "masked_sum",
    "noisy_sum", "noisy_unclipped_fraction", "paper_gaussian", "paper_sigma", "poisson_batch",
    "poisson_capacity", "poisson_schedule", "value_noise_multiplier",
    "NON_PRIVATE_METRICS", "ClientDP", "PrivacyPlan", "ServerDP",
]
