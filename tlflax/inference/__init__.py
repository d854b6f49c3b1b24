"""A pretrained network used as it is, without training it.

Modules: `classify` (top-k classes of image files, with the preprocessing
and class names that belong to the weights), `features` (one stage's outputs
for every example of a dataset, written as .npy), `linear_probe` (a grid of
linear heads fitted on those features at once).
"""
