"""Input data: image files and datasets -> NHWC float32 batches."""

from tlflax.data.datasets import build
from tlflax.data.pipeline import Dataset

__all__ = ["Dataset", "build"]
