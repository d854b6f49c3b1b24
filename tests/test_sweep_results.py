"""The sweep's table, CSV and plots, from hand-made rows (no training)."""

import csv
import json
import os

import numpy as np
import pytest

from tlflax import sweeps
from tlflax.sweeps import plots
from tlflax.sweeps import results as sweep_results
from tlflax.sweeps import runner
from tlflax.sweeps.results import Row
from tlflax.training import loop, metrics


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
  series = plots.plot_series(depth_rows(), "freeze.rules")
  assert [s.label for s in series] == ["init.weights=/pre", "init.weights=scratch"]
  pretrained, scratch = series
  assert pretrained.xs == [0, 1, "probe"]
  assert pretrained.accuracies == [[60.0, 64.0], [70.0, 72.0], [66.0, 66.0]]
  assert pretrained.means == pytest.approx([62.0, 71.0, 66.0])
  assert scratch.xs == ["full"] and scratch.means == pytest.approx([35.0])
  # The baseline adds no tick; the rest are categorical, in order of appearance.
  assert plots.axis_ticks(series) == [0, 1, "probe"]


def test_numeric_x_values_give_a_numeric_axis():
  rows = [Row(f"p{i}", {"optimizer.learning_rate": lr, "seed": s}, 0.5 + lr, 0.1, 1, 0.1)
          for i, (lr, s) in enumerate([(0.1, 0), (0.1, 1), (0.01, 0), (0.01, 1)])]
  series = plots.plot_series(rows, "optimizer.learning_rate")
  assert len(series) == 1 and series[0].label == "all points"
  assert series[0].xs == [0.1, 0.01]
  assert plots.axis_ticks(series) is None


@pytest.mark.parametrize("value, expected", [
    ("depth:3", 3), ("linear_probe", "probe"), ("none", "full"), ("surgical:stage2",
                                                                  "surgical:stage2")])
def test_freeze_specs_on_the_x_axis(value, expected):
  assert plots.x_value("freeze.rules", value) == expected


@pytest.mark.parametrize("x_key", ["freeze.rules", "init.weights"])
def test_plot_writes_a_png(tmp_path, x_key):
  path = tmp_path / "plot.png"
  plots.plot(depth_rows(), str(path), x_key)
  data = path.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_plotting_against_a_setting_no_point_varies_is_refused():
  with pytest.raises(sweep_results.SweepError, match="No point sets 'optimizer.learning_rate'"):
    plots.plot_series(depth_rows(), "optimizer.learning_rate")


def test_collect_outside_a_sweep_says_what_to_run(tmp_path):
  with pytest.raises(sweep_results.SweepError, match="is not a sweep's workdir. Run"):
    sweep_results.collect(str(tmp_path))


# ----------------------------------------------------------------------------
# Grouped sweeps (the demo): accuracy by group
# ----------------------------------------------------------------------------

def demo_rows():
  """The demo's shape: an ungrouped pretraining run, then three groups of seeds."""
  rows = [Row("pretrain", {"init.weights": "", "freeze.rules": "none", "seed": 0,
                           "data.name": "source"}, 0.967, 0.1, 200, 60.0)]
  long_start = "/home/someone/workdirs/transfer_demo_with_a_long_name/pretrain"
  for group, settings, accuracies in (
      ("scratch", {"init.weights": ""}, (0.40, 0.50, 0.45)),
      ("frozen_features", {"init.weights": long_start, "freeze.rules": "linear_probe"},
       (0.60, 0.70)),
      ("fine_tune", {"init.weights": long_start}, (0.70, 0.80, 0.75, 0.71))):
    for seed, accuracy in enumerate(accuracies):
      rows.append(Row(f"{group}__seed-{seed}", {**settings, "seed": seed, "data.name": "target"},
                      accuracy, 1 - accuracy, 40, 2.0, "pretrained", "", group))
  return rows


# Accuracies are fractions shown in %: 100 x a fraction in float64 is not
# always the decimal (100 * 0.7 = 70.00000000000001), so comparisons in % use
# pytest.approx at its default relative 1e-6, far below the 0.1 points shown.


def test_groups_are_the_tables_rows_and_ungrouped_points_are_set_aside():
  groups, others = plots.group_results(demo_rows())
  assert [g.name for g in groups] == ["scratch", "frozen_features", "fine_tune"]
  assert groups[1].accuracies == pytest.approx([60.0, 70.0])
  # The same mean and sample std (n - 1) as results.md: 65 ± 7.07.
  assert (groups[1].mean, groups[1].std) == pytest.approx((65.0, 50 ** 0.5))
  assert [(o.name, o.accuracies) for o in others] == [("pretrain", [pytest.approx(96.7)])]


def test_the_group_plot_has_short_labels_a_bar_per_group_and_a_dot_per_seed():
  title = "Transfer from digits 0-4 to digits 5-9 with 5 labels per class (CIFAR ResNet-20)"
  figure = plots.by_group_figure(demo_rows(), title)
  (axes,) = figure.axes
  labels = [t.get_text() for t in axes.get_xticklabels()]
  assert labels == ["scratch\n45.0 ± 5.0\nn=3", "frozen_features\n65.0 ± 7.1\nn=2",
                    "fine_tune\n74.0 ± 4.5\nn=4"]
  assert list(axes.get_xticks()) == [0, 1, 2]
  # Every seed is a dot at its group's position (jittered by less than half a step).
  dots = [collection.get_offsets() for collection in axes.collections
          if len(collection.get_offsets()) and collection.get_offsets().shape[1] == 2
          and type(collection).__name__ == "PathCollection"]
  assert [len(d) for d in dots] == [3, 2, 4]
  for position, d in enumerate(dots):
    assert np.all(np.abs(d[:, 0] - position) < 0.5)
  assert sorted(dots[2][:, 1]) == pytest.approx([70.0, 71.0, 75.0, 80.0])
  # One error bar per group: from mean - std to mean + std, the mean marked.
  bars = [(container.lines[0].get_ydata()[0], container.lines[2][0].get_segments()[0][:, 1])
          for container in axes.containers]
  std = np.std([70.0, 80.0, 75.0, 71.0], ddof=1)
  assert [mean for mean, _ in bars] == pytest.approx([45.0, 65.0, 74.0])
  assert list(bars[2][1]) == pytest.approx([74.0 - std, 74.0 + std])
  assert figure.get_suptitle().replace("\n", " ") == title
  assert axes.get_ylabel() == "eval accuracy (%)"
  assert "pretrain 96.7%" in axes.get_xlabel()  # set aside, but stated
  assert "/home/someone" not in " ".join(labels + [axes.get_xlabel(), axes.get_title()])


def test_many_groups_get_slanted_names_that_stay_in_the_figure():
  rows = [Row(f"{name}__seed-{seed}", {"seed": seed}, 0.5, 0.5, 1, 1.0, group=name)
          for name in [f"linear_probe-pretrained-{k}" for k in range(12)] for seed in (0, 1)]
  figure = plots.by_group_figure(rows, "a title")
  (axes,) = figure.axes
  labels = axes.get_xticklabels()
  assert [t.get_text() for t in labels] == [f"linear_probe-pretrained-{k}" for k in range(12)]
  assert all(t.get_rotation() == 35 for t in labels)
  figure.draw_without_rendering()  # runs the layout
  inside = figure.bbox
  for label in labels:
    box = label.get_window_extent()
    assert inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0


def test_tick_labels_wrap_after_underscores_and_hyphens():
  assert plots.tick_label("frozen_features", 10) == "frozen_\nfeatures"
  assert plots.tick_label("linear_probe-pretrained", 14) == "linear_probe-\npretrained"
  assert plots.tick_label("scratch", 4) == "scratch"  # one piece: never cut


def test_the_depth_plot_legend_fits_inside_the_figure():
  figure = plots.series_figure(depth_rows(), "freeze.rules")
  (legend,) = figure.legends
  assert [t.get_text() for t in legend.get_texts()] == [
      "init.weights=/pre (n=2)", "init.weights=scratch (full, n=2)"]
  figure.draw_without_rendering()  # runs the layout
  box, inside = legend.get_window_extent(), figure.bbox
  assert inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0
  assert figure.get_suptitle() == "eval accuracy vs freeze depth"


@pytest.fixture
def umask_027():
  old = os.umask(0o027)
  yield 0o027
  os.umask(old)


def grouped_sweep(workdir):
  """A sweep's workdir with the demo's points finished by hand (result.json each)."""
  config = loop_free_config()
  points = sweeps.make_points([{"name": "pretrain"},
                               *sweeps.seeded("scratch", {"init.weights": ""}, range(2)),
                               *sweeps.seeded("fine_tune", {"init.weights": "@pretrain"},
                                              range(2))], config)
  runner.prepare(config, points, str(workdir), title="Transfer to digits 5-9")
  return points


def loop_free_config():
  from tlflax import defaults  # pylint: disable=import-outside-toplevel
  config = defaults.base_config()
  config.lock()
  return config


def test_a_grouped_sweep_writes_accuracy_by_group_and_normal_permissions(tmp_path, umask_027,
                                                                          monkeypatch):
  points = grouped_sweep(tmp_path)
  accuracy = iter([0.96, 0.4, 0.5, 0.7, 0.8])
  monkeypatch.setattr(loop, "train_and_evaluate", lambda config, workdir: {
      "eval/accuracy": next(accuracy), "eval/loss": 1.0, "step": 40, "start": "scratch"})
  for point in points:
    runner.run_point(loop_free_config(), point, str(tmp_path))
  sweep_results.write_reports(str(tmp_path))
  assert (tmp_path / "accuracy_by_group.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert not (tmp_path / "accuracy_vs_depth.png").exists()
  for name in ("sweep.json", "results.csv", "results.md", "accuracy_by_group.png",
               "fine_tune__seed-1/result.json"):
    assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name  # 0666 less the umask


def test_a_points_result_json_is_a_single_runs_plus_the_point(tmp_path, monkeypatch):
  (point,) = sweeps.make_points([{"name": "only", "seed": 3}], loop_free_config())
  result = {"eval/accuracy": 0.5, "eval/loss": 1.0, "step": 40, "start": "scratch"}
  monkeypatch.setattr(loop, "train_and_evaluate", lambda config, workdir: dict(result))
  record = runner.run_point(loop_free_config(), point, str(tmp_path))
  assert json.loads((tmp_path / "only" / "result.json").read_text()) == record
  single = metrics.result_record(result, wall_seconds=1.0)
  assert set(record) == {"point", "overrides"} | set(single)
  assert record["metrics"] == single["metrics"]
  assert (record["point"], record["overrides"]) == ("only", {"name": "only", "seed": 3})
