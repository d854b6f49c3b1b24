"""Backbones with named stages: torchvision/Keras ResNets and VGGs, CIFAR ResNets.

Every model `get_model` builds is a `Backbone` (see `tlflax.models.base`):
its `stage_names`, truncation (`last_stage`), prefix input (`input_stage`),
head (`num_classes`), frozen BatchNorm layers and dtype are declared there,
with the functions that read features from any backbone.
"""

from tlflax.models.base import (LOGITS, Backbone, check_stage, extract_features,
                                feature_names, model_for_stage)
from tlflax.models.layers import PRE_LOGITS
from tlflax.models.registry import get_model, model_names, register

__all__ = (
    "Backbone",
    "LOGITS",
    "PRE_LOGITS",
    "check_stage",
    "extract_features",
    "feature_names",
    "get_model",
    "model_for_stage",
    "model_names",
    "register",
)
