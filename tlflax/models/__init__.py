"""Backbones with named stages: torchvision/Keras ResNets and VGGs, CIFAR ResNets."""

from tlflax.models.registry import (PRE_LOGITS, extract_features, get_model,
                                    model_names, register)

__all__ = ["PRE_LOGITS", "extract_features", "get_model", "model_names", "register"]
