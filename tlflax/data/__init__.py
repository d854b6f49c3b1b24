"""Input data: image files and datasets -> NHWC float32 batches."""
