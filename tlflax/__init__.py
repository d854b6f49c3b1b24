"""tlflax: transfer learning in JAX.

The package follows the flow of a run:

    defaults (the config schema) -> data -> models + weights -> build (config ->
    model and starting variables) -> freeze -> optim -> steps, stages, sharding ->
    training (the loop, checkpoints, metrics) -> sweeps (many runs) ;
    inference (a network used as it is: classify, features, linear probes) ;
    cli (the command lines) ; tree, files (shared helpers)

    import tlflax
    model = tlflax.get_model("resnet50", num_classes=10)
    result = tlflax.train_and_evaluate(config, "workdirs/run")
"""

from tlflax import (build, data, defaults, files, freeze, models, optim, sharding, stages, steps,
                    sweeps, training, tree, weights)
from tlflax.build import Built, build_extractor
from tlflax.defaults import base_config
from tlflax.freeze import Freezing, compile_rules, rules_from_spec
from tlflax.models import Backbone, extract_features, get_model, model_names
from tlflax.optim import make_optimizer
from tlflax.steps import TrainState, create_train_state, make_eval_step, make_train_step
from tlflax.sweeps import run_sweep
from tlflax.training import train_and_evaluate
from tlflax.weights import merge_pretrained

__all__ = ["Backbone", "Built", "Freezing", "TrainState", "base_config", "build",
           "build_extractor", "compile_rules", "create_train_state", "data", "defaults",
           "extract_features", "files", "freeze", "get_model", "make_eval_step",
           "make_optimizer", "make_train_step", "merge_pretrained", "model_names", "models",
           "optim", "rules_from_spec", "run_sweep", "sharding", "stages", "steps", "sweeps",
           "train_and_evaluate", "training", "tree", "weights"]
