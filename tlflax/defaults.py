"""Every config key tlflax reads, with its default.

Config files in `configs/` start from `base_config()` and override keys; the
command line (`--config.key=value`) can override any of them, and a misspelt
key fails because the config is locked.
"""

from __future__ import annotations

import ml_collections

from tlflax import optim


def base_config() -> ml_collections.ConfigDict:
  """The full schema with defaults."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  # The network: a registered name, its options, and where its weights come from.
  config.model = ml_collections.ConfigDict(dict(
      name="cifar_resnet20",
      dtype="float32",        # computation dtype; "bfloat16" on accelerators
      last_stage="",          # truncate after this stage ("" = whole network)
      head_init="lecun",      # a new head starts: lecun (flax default) | zeros (big_transfer)
  ))
  # Start-up order: resume from the workdir, else these weights, else scratch.
  config.init = ml_collections.ConfigDict(dict(
      weights="",             # weight file, tlflax checkpoint dir or pretrained id; "" = scratch
      source="",              # torchvision | timm | keras | tlflax ("" for an id) | workdir
      keep_head=False,        # True: keep the pretrained head (same classes, e.g. to resume a task)
      up_to_stage="",         # copy only the stem ... this stage; later ones stay freshly initialised
  ))

  config.data = ml_collections.ConfigDict(dict(
      source="tfds",          # tfds | folder | digits
      name="",                # tfds name (e.g. "cifar10"), or the digits task ("source"/"target")
      data_dir="",            # tfds data_dir ("" = tfds default)
      path="",                # image folder root (one sub-folder per class)
      train_split="train",
      eval_split="test",
      image_size=32,          # network input size
      resize_size=0,          # eval: shorter side before centre crop (0 = image_size)
      mean=(0.485, 0.456, 0.406),
      std=(0.229, 0.224, 0.225),
      augment="crop_flip",    # crop_flip (pad 4 and crop) | random_resized_crop | none
      train_examples_per_class=0,  # few-shot subset of the train split (0 = all)
      # With a few-shot subset: evaluate on the eval split plus the train
      # examples left out of the subset (every image the run never saw).
      eval_on_unused_train=False,
      # Image folders: every file's header is checked before training; True
      # leaves out files that are no images (counted and named) instead of stopping.
      skip_bad_files=False,
      # Worker processes (Grain) that decode and augment batches: -1 = one per
      # CPU core where images are files to decode; 0 = threads in this process.
      num_workers=-1,
      # Who decodes and transforms image files: "pil" (Grain workers, any
      # host), "dali" (NVIDIA DALI on the GPU; pip install nvidia-dali-cuda120)
      # or "dali_cpu" (the same DALI graph on the host's cores). See
      # tlflax/data/dali_engine.py for what changes in the pixels.
      engine="pil",
  ))

  config.batch_size = 128     # global batch, split over all devices
  config.eval_batch_size = 256
  config.num_epochs = 10.0
  config.num_train_steps = 0  # > 0 overrides num_epochs

  config.freeze = ml_collections.ConfigDict(dict(
      rules="none",           # spec string (see tlflax.freeze.rules_from_spec)
      batchnorm_mode="frozen_layers",
  ))
  # Staged fine-tuning: a list of stage dicts (see tlflax.stages; recipes
  # stages.lp_ft, gradual_unfreezing, delayed_backbone). Empty: one stage made
  # of freeze.rules, optimizer and num_epochs / num_train_steps.
  config.stages = ()
  # Train a frozen prefix's output from a cache (see tlflax.training.prefix_cache);
  # used by stages whose stem and first stages are frozen, with data.augment="none".
  config.prefix_cache = ml_collections.ConfigDict(dict(
      enabled=False,
      directory="",           # "" = $TLFLAX_CACHE_DIR/prefix (~/.cache/tlflax/prefix)
  ))
  config.optimizer = optim.default_config()
  config.label_smoothing = 0.0

  config.log_every_steps = 50
  config.eval_every_steps = 0     # 0 = once per epoch
  config.checkpoint_every_steps = 0  # 0 = once per epoch
  config.keep_checkpoints = 3
  config.best_metric = "eval/accuracy"  # also keep the best checkpoint by this

  # Multi-host: leave empty to let jax.distributed read the cluster (SLURM, TPU).
  config.distributed = ml_collections.ConfigDict(dict(
      enabled=False,
      coordinator_address="",
      num_processes=0,
      process_id=-1,
      cpu_collectives="gloo",  # how CPU-only processes talk to each other
  ))
  return config
