"""The default experiment config: every field, with a comment.

Presets import this and change fields. Any field can be overridden on the command line:
  python -m fedpeft_jax.main --config=configs/default.py --workdir=runs/x \
      --config.peft.method=lora --config.federated.clients_per_round=8
"""

import ml_collections

from fedpeft_jax.federated import personal
from fedpeft_jax.peft.config import default_config as peft_default
from fedpeft_jax.privacy.config import default_privacy_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  # Init, partition, sampling and local shuffles derive from it; DP noise does not (its key
  # comes from the OS unless privacy.reproducible_noise=True).
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.variant = "B/16"  # ViT size/patch, e.g. 'Ti/16', 'S/16', 'B/16', 'L/16'.
  c.model.image_size = 224  # model resolution; images are resized on device.
  c.model.hidden_size = 0  # > 0 overrides the variant (tiny models); likewise below.
  c.model.depth = 0
  c.model.num_heads = 0
  c.model.mlp_dim = 0
  c.model.patch_size = 0
  c.model.pool = "token"  # 'token' (class token) or 'gap'.
  c.model.representation_size = 0  # > 0: pre-logits Dense+tanh of this size.
  c.model.dropout = 0.0
  c.model.attention_dropout = 0.0
  c.model.attention = "auto"  # 'auto' (cuDNN fused attention on GPU in half precision where the shape allows, else the explicit form), 'explicit', 'xla', 'cudnn'.
  c.model.dtype = "auto"  # compute dtype: 'auto' (bfloat16 on GPU/TPU, float32 on CPU), 'float32', 'bfloat16', 'float16'.
  c.model.pretrained = ""  # path, URL or registry name (e.g. 'vit_b16_in21k'); '' = from scratch.
  c.model.cache_dir = ""  # download cache for URLs and registry names ('' = ~/.cache/fedpeft_jax).

  c.peft = peft_default()  # c.peft.method: full, head, bias, prompt, adapter, lora, ssf, or 'a+b'.

  c.data = ml_collections.ConfigDict()
  c.data.dataset = "cifar100"  # TFDS name, or 'digits', 'fashion_mnist', 'synthetic'.
  c.data.data_dir = ""  # TFDS data_dir / IDX directory ('' = the library default).
  c.data.partition = "dirichlet"  # 'iid', 'dirichlet' or 'shards'.
  c.data.alpha = 0.1  # Dirichlet concentration (smaller = more heterogeneous).
  c.data.min_size = 10  # Dirichlet: redraw until every client holds at least this many.
  c.data.shards_per_client = 2  # 'shards': classes per client.
  c.data.train_size = 0  # > 0: subsample the training set to this many examples.
  # Validation split held out of the training pool before partitioning (stratified, from the
  # seed's validation stream; no client holds it): a fraction in (0, 1) or a count; 0 = none.
  # Selections (best round, sweeps) use it; the test split is only reported.
  c.data.val_size = 0.0
  c.data.sample_with_replacement = False  # the study's authors subsampled with replacement.
  c.data.augment = "auto"  # 'auto' (the dataset's study augmentation), 'crop_flip', 'flip', 'none'.
  c.data.resolution = 32  # native resolution of 'digits' and 'synthetic'.
  c.data.host_resolution = 0  # TFDS: > 0 resizes images on the host at load time (memory).
  # Comma-separated original class ids to keep, relabelled 0..k-1 in this order (e.g.
  # "5,6,7,8,9": a close-domain target of new classes); "" = every class.
  c.data.classes = ""

  c.federated = ml_collections.ConfigDict()
  c.federated.rounds = 50
  c.federated.num_clients = 64
  c.federated.clients_per_round = 0  # > 0 wins over participation.
  c.federated.participation = 0.125  # fraction of clients sampled per round.
  c.federated.local_epochs = 10
  c.federated.local_steps = 0  # > 0: a fixed number of local steps instead of full epochs.
  c.federated.batch_size = 64
  c.federated.client_optimizer = "sgd"  # 'sgd', 'adam', 'adamw'.
  c.federated.client_lr = 1e-2
  c.federated.client_momentum = 0.9
  c.federated.client_nesterov = True
  c.federated.client_weight_decay = 1e-4
  c.federated.label_smoothing = 0.0
  c.federated.fedprox_mu = 0.0  # > 0: FedProx proximal term.
  c.federated.server_optimizer = "fedavg"  # 'fedavg', 'fedavgm', 'fedadam', 'fedyogi', 'fedadagrad'.
  c.federated.server_lr = 1.0
  # 'constant' (the study's) or 'cosine': server_lr decays to 0 over the rounds.
  c.federated.server_lr_schedule = "constant"
  c.federated.server_momentum = 0.9  # fedavgm.
  c.federated.server_b1 = 0.9  # fedadam / fedyogi / fedadagrad momentum (0 = none).
  c.federated.server_b2 = 0.99  # fedadam / fedyogi.
  c.federated.server_eps = 1e-3  # Reddi et al.'s tau (also v_{-1} = tau**2).
  # fedadam / fedyogi: False = Reddi et al.'s Algorithm 2 as published; True = Adam's
  # bias correction (moments from zero, divided by 1 - beta**t; fedadam = optax.adam).
  c.federated.server_bias_correction = False
  c.federated.weighting = "examples"  # 'examples' (weighted by client size) or 'uniform'.
  c.federated.dropout = 0.0  # probability that a sampled client fails to report.
  # 'uniform' (exactly clients_per_round each round) or 'poisson' (each client with
  # probability clients_per_round / num_clients: DP-FedAvg's draw, for a matched non-DP
  # reference). DP-FedAvg with privacy.sampling='poisson' always draws by Poisson.
  c.federated.client_sampling = "uniform"
  c.federated.max_update_norm = 0.0  # > 0: clip each client update at the server (robustness).
  c.federated.clients_per_chunk = "auto"  # int, or 'auto' (1 on CPU; fills accelerators).
  c.federated.feature_cache = "auto"  # 'auto': cache the frozen prefix's output when valid; 'off'.
  c.federated.eval_every = 1  # evaluate the global model every this many rounds (and the last).
  c.federated.eval_batch_size = 256
  c.federated.wire_dtype = "float32"  # dtype of the transmitted trainable params.
  # Upload compression: 'none', 'int8' / 'int4' (absmax scales, stochastic rounding: the
  # decoded update is unbiased) or 'topk' (largest entries, with each client's error-feedback
  # residual kept in per-client state). Downloads stay at wire_dtype.
  c.federated.compression = "none"
  c.federated.compression_block = 0  # int8/int4: values per scale (0 = one per tensor)
  c.federated.compression_fraction = 0.1  # topk: share of each tensor's entries sent
  # Personalisation: comma-separated regexes over trainable param paths ('a/b/c') whose
  # leaves stay on each client (per-client state), never uploaded or averaged:
  # 'head' = FedPer, 'lora_b' = FedSA-LoRA. '' = none.
  c.federated.personal = ""
  # 'none' (personal and shared leaves trained together), 'fedrep' (personal_epochs on the
  # personal leaves first, then local_epochs on the shared ones) or 'fedbabu' (personal
  # leaves frozen at init during training, fine-tuned per client before evaluation).
  c.federated.personal_schedule = "none"
  # fedrep: local epochs on the personal leaves before local_epochs on the shared ones.
  # FedRep as published: 10 head epochs, then 1 body epoch (set local_epochs = 1).
  c.federated.personal_epochs = personal.FEDREP_HEAD_EPOCHS
  c.federated.personal_finetune_epochs = 1  # fedbabu: local fine-tuning epochs.
  # Also score the global model on per-client test sets (always on with `personal`).
  c.federated.eval_per_client = False
  # Per-client test set size (0 = the client's share of the test split, by training size).
  c.federated.local_test_size = 0
  # How LoRA factors are aggregated (peft.method must include lora for all but 'fedit'):
  # 'fedit' averages A and B separately (Zhang et al. 2024); 'ffa' freezes A (FFA-LoRA, Sun
  # et al. 2024; = peft.lora.freeze_a); 'fedex' adds the residual that makes the global
  # model the exact average (FedEx-LoRA, Singhal et al. 2025); 'flora' folds the stacked
  # product into the frozen weights and restarts LoRA each round (FLoRA, Wang et al. 2024;
  # allows peft.lora.client_ranks). fedex / flora need server_optimizer='fedavg',
  # server_lr=1.0 and privacy.mechanism='none'; their downloads carry the folded deltas.
  c.federated.lora_aggregation = "fedit"

  c.privacy = default_privacy_config()

  c.checkpoint_every = 5  # rounds between orbax checkpoints (0 = only at the end).
  c.keep_checkpoints = 3
  return c
