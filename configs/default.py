r"""The default experiment: a capacity-annealed beta-VAE on procedural dSprites.

Offline, on a laptop CPU. Run it with

  make train    # then: make report
  # or: capvae train --config configs/default.py --workdir runs/default

The Burgess et al. 2018 setting (gamma 1000, the paper's conv model, Bernoulli
decoder, batch 64, Adam 1e-4) with C rising at the slope of
``burgess_dsprites.py`` compressed four times (1 nat per 1,000 steps), for
the first 4,000 steps: C goes from 0 to 4 nats. Expect about 4.5 minutes on
2 CPU cores (~0.065 s a step on the AMD EPYC this was measured on).

What you should see (``make report``): the batch KL stays within a few tenths
of a nat of C; the reconstruction falls from ~2,800 nats (random logits)
through ~470 (the mean image, while C is under a nat) to ~200; and the first
latents to take capacity encode position, one factor each: two active latents,
one for posY and one for posX (``make report``'s latent table; measured:
MI / H(factor) 0.28 and 0.31), while every other latent stays at the prior
(held-out KL under 0.1 nats). That is the
start of Burgess et al.'s Fig. 3; ``docs/reproduction.md`` shows what longer
schedules do after it.

The learning rate is 1e-4, not 5e-4: at 5e-4 this schedule collapses (the
encoder's KL is paid with a constant shift of the means, which carries nothing;
``docs/reproduction.md``).
"""

import ml_collections


def get_config():
  """Returns the default config; every field is documented here."""
  config = ml_collections.ConfigDict()

  # Data. 'dsprites' and 'shapes3d_procedural' render images from factors inside
  # the train step; for 'dsprites', dataset_path may name the official .npz.
  # 'tfds:<name>[/<config>]' reads a prepared TensorFlow Datasets dataset
  # (array_record) from the data_dir dataset_path, split dataset_split.
  config.dataset = 'dsprites'
  config.dataset_path = ''
  config.dataset_split = 'train'
  config.data_seed = 0

  # Model: 'burgess' | 'locatello' | 'mlp'.
  config.model = 'burgess'
  config.latent_size = 10
  # How parameters start: 'lecun' (Flax's defaults) | 'torch' (PyTorch's) |
  # 'kaiming' (1Konny/Beta-VAE's). The start of a slow capacity schedule
  # depends on it (docs/reproduction.md, §1).
  config.init = 'lecun'

  # Objective: 'capacity' (Burgess: rec + gamma·|KL − C|) | 'beta' (rec + beta·KL)
  # | 'beta_tcvae' | 'factor_vae' | 'dip_vae' | 'controlled_capacity' (below).
  config.objective = 'capacity'
  # 'bernoulli' (logits) | 'gaussian' (fixed variance) | 'raw_dim_mse'.
  config.reconstruction = 'bernoulli'
  config.gaussian_variance = 1.0
  # 'abs': |mean KL − C| (paper) | 'abs_per_example': mean |KL − C| | 'squared'.
  config.capacity_penalty = 'abs'
  # Capacity schedule: 'linear' | 'cosine' | 'constant' | 'staircase' (linear,
  # but C held for c_stair_steps steps at a time, as a per-epoch callback sets it).
  config.schedule = 'linear'
  config.gamma = 1000.0
  config.c_max = 4.0
  config.c_anneal_steps = 4000
  config.c_stair_steps = 1
  # beta objective only: beta, and whether to use the normalised form
  # rec/N + beta_norm·KL/M (beta_norm = beta·M/N).
  config.beta = 1.0
  config.beta_norm = False

  # The objectives researchers compare against (disentanglement_lib's
  # definitions; configs/beta_tcvae.py, factor_vae.py, dip_vae.py):
  # 'beta_tcvae': rec + KL + (beta − 1)·TC, TC by minibatch-weighted ('mws')
  # or -stratified ('mss') sampling.
  config.tc_estimator = 'mws'
  # 'factor_vae': rec + KL + gamma·TC, TC from a discriminator of
  # discriminator_layers × discriminator_units (leaky ReLU), trained by Adam at
  # disc_learning_rate (b1 0.5, b2 0.9).
  config.discriminator_layers = 6
  config.discriminator_units = 1000
  config.disc_learning_rate = 1e-4
  # 'dip_vae': rec + KL + lambda_od·Σ off-diag Cov² + lambda_d·Σ (diag Cov − 1)²,
  # lambda_d = lambda_d_factor·lambda_od; Cov of the means ('i') or of the
  # aggregate posterior ('ii').
  config.dip_type = 'i'
  config.lambda_od = 1.0
  config.lambda_d_factor = 10.0
  # 'controlled_capacity': rec + beta(t)·KL, beta(t) set every step by a PI
  # controller (ControlVAE) so the batch KL follows C(t) of the schedule above;
  # gains kp, ki and bounds [beta_min, beta_max] (configs/controlled_capacity.py).
  config.kp = 0.01
  config.ki = 0.001
  config.beta_min = 1.0
  config.beta_max = 1000.0

  # Optimisation.
  config.optimizer = 'adam'
  config.learning_rate = 1e-4
  config.adam_b1 = 0.9
  config.adam_b2 = 0.999
  config.adam_eps = 1e-8
  config.batch_size = 64
  # Devices that split each member's batch (data parallel; the same gradient up
  # to float rounding, capvae.train.data_parallel_grads). It must divide the
  # batch and the device count. On a CPU, JAX_NUM_CPU_DEVICES=2 makes two
  # devices of two cores, and data_shards = 2 then trains one member on both.
  config.data_shards = 1
  config.num_steps = 4000
  config.seed = 0

  # Sweeps (see capvae/sweep.py): which traced hyperparameters vary, e.g.
  #   config.sweep.product = dict(gamma=[100., 1000.], seed=[0, 1, 2])
  #   config.sweep.zip = dict(c_max=[5., 25.], c_anneal_steps=[500, 2000])
  # Empty: one member with the values above.
  config.sweep = ml_collections.ConfigDict(
      {'product': ml_collections.ConfigDict(), 'zip': ml_collections.ConfigDict()})
  # Members trained together (0: all); chunks of this many run one after another.
  config.chunk_size = 0
  # How a device runs its members: 'map' (one after another, each bit for bit a
  # single run), 'vmap' (batched), 'auto' (map on CPU, vmap on GPU/TPU).
  config.member_loop = 'auto'
  # How the layers compute (the same function and parameters either way):
  # 'matmul' (matrix products with written-out gradients, fast on CPU), 'xla'
  # (XLA's own convolutions), 'auto' (matmul on CPU, xla on GPU/TPU).
  config.conv_impl = 'auto'
  # Devices the member axis is split over (0: all devices of all processes).
  # Where a member runs does not change its numbers; see the README.
  config.num_devices = 0

  # Bookkeeping (may change when a run is resumed).
  config.log_every = 100
  config.checkpoint_every = 1000
  config.keep_checkpoints = 2
  # Where training reports besides metrics.jsonl (capvae/tracking.py), a list of
  # 'tensorboard' (WORKDIR/tb; `tensorboard --logdir runs/`), 'wandb', 'mlflow'
  # (the last two: pip install 'capvae[trackers]'); on the command line
  # --config.trackers=tensorboard,wandb. W&B runs in project tracker_project,
  # in wandb_mode 'offline' (`wandb sync` uploads later) | 'online' | 'disabled';
  # MLflow's experiment is tracker_project, its store mlflow_uri (empty: a file
  # store in WORKDIR/mlruns). log_images: reconstructions and traversals at
  # each checkpoint.
  config.trackers = ('tensorboard',)
  config.tracker_project = 'capvae'
  config.wandb_mode = 'offline'
  config.mlflow_uri = ''
  config.log_images = True
  return config
