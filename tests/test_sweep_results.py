"""The sweep's table, CSV and plot, from hand-made rows (no training)."""

import csv

import pytest

from tlflax.sweeps import results as sweep_results
from tlflax.sweeps.results import Row


def depth_rows():
  """Pretrained at depth 0, 1 and the linear probe, and a scratch baseline; 2 seeds each."""
  rows = []
  for freeze, weights, accuracies in (("depth:0", "/pre", (0.60, 0.64)),
                                      ("depth:1", "/pre", (0.70, 0.72)),
                                      ("linear_probe", "/pre", (0.66, 0.66)),
                                      ("none", "", (0.30, 0.40))):
    for seed, accuracy in enumerate(accuracies):
      settings = {"freeze.rules": freeze, "seed": seed, "init.weights": weights}
      rows.append(Row(f"{freeze}-{weights}-{seed}", settings, accuracy, 1.0 - accuracy, 40,
                      2.5, "pretrained"))
  return rows


def test_markdown_table_gives_mean_std_and_n_per_group():
  table = sweep_results.markdown_table(depth_rows(), missing=["late_point"], title="Depth")
  lines = table.splitlines()
  assert lines[0] == "Depth"
  assert lines[2] == ("| freeze.rules | init.weights | n | eval accuracy (%) | per seed | "
                      "eval loss | steps |")
  assert lines[4:8] == [
      "| depth:0 | /pre | 2 | 62.0 ± 2.8 | 60.0, 64.0 | 0.380 | 40 |",
      "| depth:1 | /pre | 2 | 71.0 ± 1.4 | 70.0, 72.0 | 0.290 | 40 |",
      "| linear_probe | /pre | 2 | 66.0 ± 0.0 | 66.0, 66.0 | 0.340 | 40 |",
      "| none | scratch | 2 | 35.0 ± 7.1 | 30.0, 40.0 | 0.650 | 40 |"]
  assert lines[-1] == "Not finished (1): late_point."


def test_csv_has_one_row_per_point_and_a_column_per_setting(tmp_path):
  rows = depth_rows()
  rows.append(Row("staged", {"freeze.rules": "none", "seed": 0, "init.weights": "",
                             "stages": [{"name": "probe"}]}, 0.5, 0.5, 40, 1.0))
  path = tmp_path / "results.csv"
  sweep_results.write_csv(rows, str(path))
  with open(path, newline="") as f:
    lines = list(csv.reader(f))
  assert lines[0] == ["point", "freeze.rules", "seed", "init.weights", "stages", "eval_accuracy",
                      "eval_loss", "steps", "wall_seconds", "start", "finished"]
  assert len(lines) == 1 + 9
  assert lines[1] == ["depth:0-/pre-0", "depth:0", "0", "/pre", "", "0.600000", "0.400000", "40",
                      "2.5", "pretrained", ""]
  assert lines[-1][:5] == ["staged", "none", "0", '""', '[{"name": "probe"}]']


def test_freeze_depth_axis_with_a_probe_tick_and_a_scratch_baseline():
  series = sweep_results.plot_series(depth_rows(), "freeze.rules")
  assert [s.label for s in series] == ["init.weights=/pre", "init.weights=scratch"]
  pretrained, scratch = series
  assert pretrained.xs == [0, 1, "probe"]
  assert pretrained.accuracies == [[60.0, 64.0], [70.0, 72.0], [66.0, 66.0]]
  assert pretrained.means == pytest.approx([62.0, 71.0, 66.0])
  assert scratch.xs == ["full"] and scratch.means == pytest.approx([35.0])
  # The baseline adds no tick; the rest are categorical, in order of appearance.
  assert sweep_results.axis_ticks(series) == [0, 1, "probe"]


def test_numeric_x_values_give_a_numeric_axis():
  rows = [Row(f"p{i}", {"optimizer.learning_rate": lr, "seed": s}, 0.5 + lr, 0.1, 1, 0.1)
          for i, (lr, s) in enumerate([(0.1, 0), (0.1, 1), (0.01, 0), (0.01, 1)])]
  series = sweep_results.plot_series(rows, "optimizer.learning_rate")
  assert len(series) == 1 and series[0].label == "all points"
  assert series[0].xs == [0.1, 0.01]
  assert sweep_results.axis_ticks(series) is None


@pytest.mark.parametrize("value, expected", [
    ("depth:3", 3), ("linear_probe", "probe"), ("none", "full"), ("surgical:stage2",
                                                                  "surgical:stage2")])
def test_freeze_specs_on_the_x_axis(value, expected):
  assert sweep_results.x_value("freeze.rules", value) == expected


@pytest.mark.parametrize("x_key", ["freeze.rules", "init.weights"])
def test_plot_writes_a_png(tmp_path, x_key):
  path = tmp_path / "plot.png"
  sweep_results.plot(depth_rows(), str(path), x_key)
  data = path.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_plotting_against_a_setting_no_point_varies_is_refused():
  with pytest.raises(sweep_results.SweepError, match="No point sets 'optimizer.learning_rate'"):
    sweep_results.plot_series(depth_rows(), "optimizer.learning_rate")


def test_collect_outside_a_sweep_says_what_to_run(tmp_path):
  with pytest.raises(sweep_results.SweepError, match="is not a sweep's workdir. Run"):
    sweep_results.collect(str(tmp_path))
