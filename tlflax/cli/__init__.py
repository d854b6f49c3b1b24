"""The command lines, one module each; the library raises, these report.

    python -m tlflax.main          train one run, or every point of a sweep config
                                   (the same as python -m tlflax.cli.train)
    python -m tlflax.cli.convert   weights of another framework -> a tlflax checkpoint
    python -m tlflax.cli.classify  top-k classes of image files
    python -m tlflax.cli.features  one stage's outputs for a dataset, written as .npy
    python -m tlflax.cli.linear_probe  linear heads on those features, a grid at once

Each is a short absl command (`tlflax.cli.app`): it parses its flags, calls
the library, and turns the library's errors into one line and a non-zero
exit status (`--debug` shows the traceback instead). `--help` lists a
command's flags.
"""
