"""The command lines, one module each; the library raises, these report.

One command runs them all, `tlflax <command> [flags]` (installed by pip; also
`python -m tlflax <command>`), from the table in `tlflax.cli.commands`:

    tlflax train      train one run, or every point of a sweep config
                      (also python -m tlflax.main, python -m tlflax.cli.train)
    tlflax convert    weights of another framework -> a tlflax checkpoint
    tlflax classify   top-k classes of image files and folders; accuracy and a
                      confusion matrix for a folder with one sub-folder per class
    tlflax features   one stage's outputs for a dataset, written as .npy
    tlflax probe      a linear probe on those features, its settings chosen by
                      cross-validation
                      (python -m tlflax.cli.linear_probe)

Each module also runs alone (`python -m tlflax.cli.convert`). Each is a short
absl command (`tlflax.cli.app`): it parses its flags, calls the library, and
turns the library's errors into one line and a non-zero exit status
(`--debug` shows the traceback instead). `--help` explains a command and
lists its flags.
"""
