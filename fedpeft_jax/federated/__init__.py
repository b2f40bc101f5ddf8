"""The federated engine: jitted rounds of vectorised clients and optax server optimizers."""

from fedpeft_jax.federated.client import (CLIENT_OPTIMIZERS, ClientDP, ClientSpec,
                                          make_client_optimizer, make_client_update,
                                          masked_cross_entropy)
from fedpeft_jax.federated.comm import WIRE_DTYPES, CommCost, comm_cost
from fedpeft_jax.federated.features import FEATURE_CACHE_MODES, InputSpec, build_cache, choose_input
from fedpeft_jax.federated.engine import (WEIGHTINGS, FederatedAlgorithm, RoundSpec, ServerDP,
                                          auto_clients_per_chunk, build_algorithm, compiled_round_bytes,
                                          device_bytes_limit, layout_clients,
                                          make_evaluate, make_mesh, place_eval_set, replicate)
from fedpeft_jax.federated.sampling import RoundPlan, plan_round, resolve_clients_per_round
from fedpeft_jax.federated.server import SERVER_OPTIMIZERS, make_server_optimizer
from fedpeft_jax.federated.state import ServerState, apply_server_update, init_server_state

__all__ = [
    "WIRE_DTYPES", "WEIGHTINGS",
    "FEATURE_CACHE_MODES", "InputSpec", "build_cache", "choose_input", "CLIENT_OPTIMIZERS", "ClientDP", "ClientSpec", "make_client_optimizer", "make_client_update",
    "masked_cross_entropy", "CommCost", "comm_cost", "FederatedAlgorithm", "RoundSpec",
    "ServerDP", "auto_clients_per_chunk", "build_algorithm", "compiled_round_bytes",
    "device_bytes_limit", "layout_clients", "make_evaluate",
    "make_mesh", "place_eval_set", "replicate", "RoundPlan", "plan_round", "resolve_clients_per_round",
    "SERVER_OPTIMIZERS", "ServerState", "apply_server_update", "init_server_state", "make_server_optimizer",
]
