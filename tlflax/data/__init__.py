"""Input data: image files and datasets -> NHWC float32 batches."""

from tlflax.data.pipeline import Dataset, build

__all__ = ["Dataset", "build"]
