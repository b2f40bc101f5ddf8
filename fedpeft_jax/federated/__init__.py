"""The federated engine: jitted rounds of vectorised clients and optax server optimizers."""

from fedpeft_jax.federated.aggregation import (WEIGHTINGS, Aggregator, Contribution, ServerDP,
                                               dp_fedavg, weighted_mean)
from fedpeft_jax.federated.client import (CLIENT_OPTIMIZERS, ClientDP, ClientSpec,
                                          make_client_optimizer, make_client_update)
from fedpeft_jax.federated import client_rows
from fedpeft_jax.federated.comm import (WIRE_DTYPES, CommCost, comm_cost, on_wire, payload_bytes,
                                        to_wire)
from fedpeft_jax.federated.compression import (COMPRESSIONS, UploadCodec, compress,
                                               compressed_bytes, upload_codec)
from fedpeft_jax.federated.engine import (ClientStateSpec, FederatedAlgorithm, RoundSpec,
                                          build_algorithm, client_state_bytes,
                                          default_aggregator)
from fedpeft_jax.federated.evaluation import make_client_evaluate
from fedpeft_jax.federated.feature_cache import (FEATURE_CACHE_MODES, build_cache,
                                            cache_builder, choose_input)
from fedpeft_jax.federated.client_slots import (MEMORY_FRACTION, auto_clients_per_chunk,
                                          compiled_round_bytes, device_bytes_limit, layout_clients,
                                          layout_shape)
from fedpeft_jax.mesh import AXIS, host_value, make_mesh, replicate, split_rows, to_global
from fedpeft_jax.federated.personal import (PERSONAL_SCHEDULES, make_finetune,
                                            make_personal_update, split_personal)
from fedpeft_jax.federated.sampling import RoundPlan, plan_round, resolve_clients_per_round
from fedpeft_jax.federated.server import (FEDOPT_KINDS, SERVER_LR_SCHEDULES, SERVER_OPTIMIZERS,
                                          make_server_optimizer, scale_by_fedopt,
                                          server_learning_rate)
# Scoring lives apart from the engine (central pre-training uses it); re-exported here.
from fedpeft_jax.scoring import InputSpec, make_evaluate, masked_cross_entropy, place_eval_set
from fedpeft_jax.federated.state import ServerState, apply_server_update, init_server_state

__all__ = [
    "WEIGHTINGS", "Aggregator", "Contribution", "ServerDP", "dp_fedavg", "weighted_mean",
    "CLIENT_OPTIMIZERS", "ClientDP", "ClientSpec", "make_client_optimizer", "make_client_update",
    "masked_cross_entropy", "WIRE_DTYPES", "CommCost", "comm_cost", "on_wire", "payload_bytes",
    "to_wire", "COMPRESSIONS", "UploadCodec", "compress", "compressed_bytes", "upload_codec", "ClientStateSpec", "client_state_bytes", "FederatedAlgorithm", "RoundSpec", "build_algorithm", "default_aggregator",
    "make_client_evaluate", "make_evaluate", "place_eval_set", "PERSONAL_SCHEDULES",
    "make_finetune", "make_personal_update", "split_personal", "FEATURE_CACHE_MODES", "InputSpec", "build_cache",
    "cache_builder",
    "choose_input", "MEMORY_FRACTION", "auto_clients_per_chunk", "compiled_round_bytes",
    "device_bytes_limit", "layout_clients", "layout_shape", "AXIS", "host_value", "make_mesh", "replicate",
    "split_rows", "to_global", "RoundPlan", "plan_round", "resolve_clients_per_round",
    "FEDOPT_KINDS", "SERVER_OPTIMIZERS", "make_server_optimizer", "scale_by_fedopt",
    "SERVER_LR_SCHEDULES", "server_learning_rate", "ServerState", "apply_server_update",
    "init_server_state", "client_rows",
]
