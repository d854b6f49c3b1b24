"""Many runs as one thing: a sweep of named points, each its own run and workdir.

A demo, an ablation of freezing depth and an experiment are all sweeps: a
config file with `get_config()` and `sweep()`, run by
`python -m tlflax.main --config FILE --workdir DIR`. Modules: `points`
(naming, checking and applying a point's overrides), `runner` (running the
points, skipping finished ones, `sweep.json`), `results` (rows, tables, CSV
and plots from the finished points).

    points = tlflax.sweeps.make_points(module.sweep(), config)
    rows = tlflax.sweeps.run_sweep(config, points, "workdirs/depth_sweep")
"""

from tlflax.sweeps.points import (Point, load_sweep_module, make_points, point_config,
                                  point_name, seeded)
from tlflax.sweeps.results import Row, SweepError, collect, markdown_table, mean_and_std
from tlflax.sweeps.runner import (check_start_weights, point_commands, prepare, run_point,
                                  run_sweep, select_point)

__all__ = ["Point", "Row", "SweepError", "check_start_weights", "collect", "load_sweep_module",
           "make_points", "markdown_table", "mean_and_std", "point_commands", "point_config",
           "point_name", "prepare", "run_point", "run_sweep", "seeded", "select_point"]
