"""Pretrained weights: one converter per source, one merge, a registry and a download cache.

    variables = tlflax.weights.load("resnet50", "resnet50-0676ba61.pth", source="torchvision")
    model = tlflax.models.get_model("resnet50", num_classes=10)
    fresh = model.init(rng, images)
    variables, report = tlflax.weights.merge_pretrained(fresh, variables)

Modules: `loader` (`load`: dispatch by source), `torchvision`, `timm`, `keras`, `native`
(tlflax checkpoints) convert one source each; `merge` checks and merges;
`reading` reads files without running code; `registry` lists the known
published weights, `download` fetches and verifies them; `convert` writes a
tlflax checkpoint with its provenance.
"""

from tlflax.weights.loader import SOURCES, convert_to_flat, load
from tlflax.weights.merge import MergeReport, WeightsError, check_fits, merge_pretrained

__all__ = ["SOURCES", "MergeReport", "WeightsError", "check_fits", "convert_to_flat", "load",
           "merge_pretrained"]
