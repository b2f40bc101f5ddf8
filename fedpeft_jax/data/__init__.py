"""Datasets, client partitioners and device-resident client data for the federated engine."""

from fedpeft_jax.data.client_data import (ClientData, client_data, eval_schedule,
                                          local_schedule, num_local_steps)
from fedpeft_jax.data.datasets import (AUGMENTS, TFDS_DATASETS, Dataset, DatasetNotPreparedError,
                                       list_datasets, load_dataset, parse_classes,
                                       prepare_command, select_classes, split_validation,
                                       subsample_indices)
from fedpeft_jax.data.idx import load_fashion_mnist, read_idx
from fedpeft_jax.data.partitioning import (METHODS, Partition, as_test_source, hold_out,
                                          partition, partition_test, validation_count)
from fedpeft_jax.data.preprocess import preprocess

__all__ = [
    "ClientData", "client_data", "eval_schedule", "local_schedule", "num_local_steps",
    "AUGMENTS", "TFDS_DATASETS", "Dataset", "DatasetNotPreparedError", "list_datasets",
    "load_dataset", "parse_classes", "prepare_command", "select_classes", "split_validation",
    "subsample_indices", "hold_out", "validation_count",
    "load_fashion_mnist", "read_idx",
    "METHODS", "Partition", "as_test_source", "partition", "partition_test", "preprocess",
]
