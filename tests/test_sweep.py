"""Sweeps: naming, running, skipping, resuming, the cluster commands and the errors.

Most tests replace `training.train_and_evaluate` with a fake whose metrics are a
known function of the config; one test trains for real, through the printed
`--point` command.
"""

import csv
import json
import math
import os
import shlex
import subprocess
import sys

import pytest

from tlflax import sweeps
from tlflax.training import loop
from tlflax.sweeps import results as sweep_results

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 2 depths x 2 seeds of a 1-step run on the offline digits (16 images a batch
# on 8 simulated devices).
SWEEP_CONFIG = '''
from tlflax import defaults

SWEEP_X = "freeze.rules"


def get_config():
  config = defaults.base_config()
  config.model.name = "cifar_resnet20"
  config.data.source = "digits"
  config.data.name = "target"
  config.data.train_examples_per_class = 5
  config.data.mean = (0.5, 0.5, 0.5)
  config.data.std = (0.5, 0.5, 0.5)
  config.batch_size = 16
  config.eval_batch_size = 32
  config.num_train_steps = 2
  config.log_every_steps = 1
  return config


def sweep():
  return [{"freeze.rules": f"depth:{depth}", "seed": seed} for depth in (0, 2) for seed in (0, 1)]
'''
NAMES = ["freeze_rules-depth_0__seed-0", "freeze_rules-depth_0__seed-1",
         "freeze_rules-depth_2__seed-0", "freeze_rules-depth_2__seed-1"]


class FakeTraining:
  """Stands in for train_and_evaluate: accuracy 0.5 + 0.1 x depth + 0.01 x seed."""

  def __init__(self, fail_on_call=None, preempt=False):
    self.workdirs = []
    self.fail_on_call = fail_on_call
    self.preempt = preempt

  def __call__(self, config, workdir):
    self.workdirs.append(workdir)
    if len(self.workdirs) == self.fail_on_call:
      raise KeyboardInterrupt("stopped by hand")
    if self.preempt:
      return {"step": 1, "preempted": True, "start": "scratch"}
    depth = int(config.freeze.rules.split(":")[1])
    return {"eval/accuracy": 0.5 + 0.1 * depth + 0.01 * config.seed,
            "eval/loss": 2.0 - 0.5 * depth, "step": config.num_train_steps, "start": "scratch"}

  @property
  def names(self):
    return [os.path.basename(w) for w in self.workdirs]


@pytest.fixture(name="config_file")
def fixture_config_file(tmp_path):
  path = tmp_path / "tiny_sweep.py"
  path.write_text(SWEEP_CONFIG)
  return path


def load(config_file, **edits):
  """The config and points of a sweep config file, as the command line builds them."""
  module = sweeps.load_sweep_module(str(config_file))
  config = module.get_config()
  for key, value in edits.items():
    setattr(config, key, value)
  config.lock()
  return config, sweeps.make_points(module.sweep(), config)


@pytest.fixture(name="fake")
def fixture_fake(monkeypatch):
  fake = FakeTraining()
  monkeypatch.setattr(loop, "train_and_evaluate", fake)
  return fake


def test_point_names_are_readable_and_stable():
  assert sweeps.point_name({"freeze.rules": "depth:2", "seed": 1}) == (
      "freeze_rules-depth_2__seed-1")
  assert sweeps.point_name({"optimizer.learning_rate": 0.05, "init.weights": ""}) == (
      "optimizer_learning_rate-0.05__init_weights-empty")
  assert sweeps.point_name({"name": "scratch", "seed": 3}) == "scratch"
  stages = [{"name": "probe", "freeze": "linear_probe"}, {"name": "all", "freeze": "none"}]
  name = sweeps.point_name({"stages": stages})
  assert name.startswith("stages-") and len(name) == len("stages-") + 10
  # The same value gives the same name (a tuple as its list); another value another name.
  assert sweeps.point_name({"stages": tuple(stages)}) == name
  assert sweeps.point_name({"stages": stages[:1]}) != name
  long_path = "/data/checkpoints/" + "x" * 60
  assert "/" not in sweeps.point_name({"init.weights": long_path})
  assert len(sweeps.point_name({f"key{i}": "v" * 30 for i in range(10)})) <= 120


def test_sweep_runs_every_point_and_writes_the_reports(tmp_path, config_file, fake):
  config, points = load(config_file)
  workdir = tmp_path / "sweep"
  rows = sweeps.run_sweep(config, points, str(workdir))

  assert fake.names == NAMES
  assert all(os.path.dirname(w) == str(workdir) for w in fake.workdirs)
  assert [r.point for r in rows] == NAMES
  result = json.loads((workdir / NAMES[3] / "result.json").read_text())
  assert result["overrides"] == {"freeze.rules": "depth:2", "seed": 1}
  assert result["metrics"]["eval/accuracy"] == pytest.approx(0.71)
  assert result["wall_seconds"] >= 0 and result["finished"].startswith("20")
  listed = json.loads((workdir / "sweep.json").read_text())
  assert [p["name"] for p in listed["points"]] == NAMES and listed["x"] == "freeze.rules"

  with open(workdir / "results.csv", newline="") as f:
    lines = list(csv.DictReader(f))
  assert list(lines[0]) == ["point", "freeze.rules", "seed", "eval_accuracy", "eval_loss",
                            "steps", "wall_seconds", "start", "finished"]
  assert [(l["point"], l["freeze.rules"], l["seed"], l["eval_accuracy"], l["steps"])
          for l in lines] == [
              (NAMES[0], "depth:0", "0", "0.500000", "2"),
              (NAMES[1], "depth:0", "1", "0.510000", "2"),
              (NAMES[2], "depth:2", "0", "0.700000", "2"),
              (NAMES[3], "depth:2", "1", "0.710000", "2")]

  table = (workdir / "results.md").read_text()
  assert "| depth:0 | 2 | 50.5 ± 0.7 | 50.0, 51.0 | 2.000 | 2 |" in table
  assert "| depth:2 | 2 | 70.5 ± 0.7 | 70.0, 71.0 | 1.000 | 2 |" in table
  png = (workdir / "accuracy_vs_depth.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_a_second_run_trains_nothing(tmp_path, config_file, fake):
  config, points = load(config_file)
  sweeps.run_sweep(config, points, str(tmp_path))
  result = tmp_path / NAMES[0] / "result.json"
  written = (result.stat().st_mtime_ns, result.read_text())
  fake.workdirs.clear()

  rows = sweeps.run_sweep(config, points, str(tmp_path))
  assert fake.workdirs == []
  assert (result.stat().st_mtime_ns, result.read_text()) == written
  assert len(rows) == 4


def test_an_interrupted_sweep_continues_with_the_unfinished_points(tmp_path, config_file,
                                                                    monkeypatch):
  config, points = load(config_file)
  interrupted = FakeTraining(fail_on_call=3)
  monkeypatch.setattr(loop, "train_and_evaluate", interrupted)
  with pytest.raises(KeyboardInterrupt):
    sweeps.run_sweep(config, points, str(tmp_path))
  assert sweep_results.missing_points(str(tmp_path)) == NAMES[2:]

  resumed = FakeTraining()
  monkeypatch.setattr(loop, "train_and_evaluate", resumed)
  sweeps.run_sweep(config, points, str(tmp_path))
  assert resumed.names == NAMES[2:]
  assert sweep_results.missing_points(str(tmp_path)) == []


def test_a_preempted_point_writes_no_result(tmp_path, config_file, monkeypatch):
  config, points = load(config_file)
  preempted = FakeTraining(preempt=True)
  monkeypatch.setattr(loop, "train_and_evaluate", preempted)
  assert sweeps.run_sweep(config, points, str(tmp_path)) is None
  assert preempted.names == NAMES[:1]  # the sweep stops: the job is being taken away
  assert not (tmp_path / NAMES[0] / "result.json").exists()


def test_collect_on_a_partial_sweep_reports_the_missing_points(tmp_path, config_file, fake,
                                                               caplog):
  config, points = load(config_file)
  sweeps.prepare(config, points, str(tmp_path))
  for point in (points[0], points[3]):
    sweeps.run_point(config, point, str(tmp_path))

  rows = sweep_results.collect(str(tmp_path))
  assert [r.point for r in rows] == [NAMES[0], NAMES[3]]
  assert sweep_results.missing_points(str(tmp_path)) == NAMES[1:3]
  assert "2 of 4 points have not finished" in caplog.text
  _, missing = sweep_results.write_reports(str(tmp_path))
  assert missing == NAMES[1:3]
  table = (tmp_path / "results.md").read_text()
  assert f"Not finished (2): {NAMES[1]}, {NAMES[2]}." in table
  assert "| depth:0 | 1 | 50.0 | 50.0 |" in table  # one seed: no spread


def test_settings_not_overridden_by_a_point_come_from_the_config(tmp_path, fake):
  config_file = tmp_path / "baseline.py"
  config_file.write_text(SWEEP_CONFIG.replace(
      "for seed in (0, 1)]",
      "for seed in (0, 1)] + [{'name': 'scratch', 'init.weights': '', 'freeze.rules': 'depth:0'}]"
  ).replace("return config", "config.init.weights = '/pretrained'\n  return config"))
  config, points = load(config_file)
  sweeps.run_sweep(config, points, str(tmp_path / "sweep"))
  rows = sweep_results.collect(str(tmp_path / "sweep"))
  assert rows[0].settings == {"freeze.rules": "depth:0", "seed": 0,
                              "init.weights": "/pretrained"}
  assert rows[-1].point == "scratch"
  assert rows[-1].settings == {"freeze.rules": "depth:0", "seed": 0, "init.weights": ""}


def test_list_prints_one_command_per_point_and_each_runs_only_its_point(tmp_path, config_file):
  workdir = tmp_path / "sweep"
  command = [sys.executable, "-m", "tlflax.main", f"--config={config_file}",
             f"--workdir={workdir}", "--config.num_train_steps=1", "--list"]
  listed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert listed.returncode == 0, listed.stderr[-3000:]
  commands = listed.stdout.strip().splitlines()
  assert len(commands) == 4
  assert all(c.endswith(f"--point={i}") and "--config.num_train_steps=1" in c
             for i, c in enumerate(commands))
  assert sweep_results.missing_points(str(workdir)) == NAMES  # sweep.json is already there

  # The one real training of this file: point 2, from another directory.
  ran = subprocess.run(shlex.split(commands[2]), cwd=tmp_path, capture_output=True, text=True,
                       timeout=600)
  assert ran.returncode == 0, ran.stderr[-3000:]
  assert sweep_results.missing_points(str(workdir)) == [NAMES[0], NAMES[1], NAMES[3]]
  result = json.loads((workdir / NAMES[2] / "result.json").read_text())
  assert result["metrics"]["step"] == 1  # the listed override reached the point
  assert 0 <= result["metrics"]["eval/accuracy"] <= 1
  assert (workdir / NAMES[2] / "metrics.jsonl").exists()

  out_of_range = subprocess.run([*command[:-1], "--point=7"], cwd=REPO, capture_output=True,
                                text=True, timeout=300)
  assert out_of_range.returncode != 0
  assert "--point 7 is out of range: this sweep has 4 points" in out_of_range.stderr

  collected = subprocess.run([sys.executable, "-m", "tlflax.main", f"--workdir={workdir}",
                              "--collect"], cwd=REPO, capture_output=True, text=True,
                             timeout=300)
  assert collected.returncode == 0, collected.stderr[-3000:]
  assert f"Not finished (3): {NAMES[0]}, {NAMES[1]}, {NAMES[3]}." in collected.stdout
  with open(workdir / "results.csv", newline="") as f:
    assert [line["point"] for line in csv.DictReader(f)] == [NAMES[2]]


def test_a_config_without_sweep_is_refused(tmp_path):
  path = tmp_path / "plain.py"
  path.write_text("from tlflax import defaults\nget_config = defaults.base_config\n")
  with pytest.raises(sweeps.SweepError, match=r"plain.py has no sweep\(\) function"):
    sweeps.load_sweep_module(str(path))


@pytest.mark.parametrize("points, message", [
    ([{"freeze.rule": "depth:1"}], r"Point 'freeze_rule-depth_1' \(sweep\(\) entry 0\) "
     r"overrides unknown config key 'freeze.rule'. Did you mean freeze.rules"),
    ([{"seed": 0}, {"name": "typo", "optimiser.learning_rate": 0.1}],
     r"Point 'typo' \(sweep\(\) entry 1\) overrides unknown config key "
     r"'optimiser.learning_rate'"),
    ([{"seed": "one"}], r"Point 'seed-one' \(sweep\(\) entry 0\)"),
    ([{"seeds": [0, 1]}], "each seed is its own point"),
    ([{"seed": 0, "name": "a"}, {"seed": 1, "name": "a"}], "Points 0 and 1 are both named 'a'"),
    ([], "non-empty list"),
    (["depth:1"], "each entry must be a dict"),
    ([{"name": "../escape"}], "is not a directory name"),
])
def test_bad_points_are_refused_before_anything_runs(points, message, config_file):
  config, _ = load(config_file)
  with pytest.raises(sweeps.SweepError, match=message):
    sweeps.make_points(points, config)


def test_a_workdir_of_another_sweep_is_refused_unless_overwrite(tmp_path, config_file, fake):
  config, points = load(config_file)
  sweeps.run_point(config, points[0], str(tmp_path))
  sweeps.prepare(config, points, str(tmp_path))
  more = sweeps.make_points([{"freeze.rules": "depth:3", "seed": 0}], config)
  with pytest.raises(sweeps.SweepError, match=r"holds a different sweep \(new points: "
                     r"freeze_rules-depth_3__seed-0; points no longer listed: "
                     r"freeze_rules-depth_0__seed-0, .*--overwrite"):
    sweeps.prepare(config, more, str(tmp_path))
  longer, _ = load(config_file, num_train_steps=5)
  with pytest.raises(sweeps.SweepError, match="config keys differ: num_train_steps"):
    sweeps.prepare(longer, points, str(tmp_path))

  # Keys that cannot change a result (caches, decoding workers) are the same sweep.
  elsewhere, _ = load(config_file)
  with elsewhere.unlocked():
    elsewhere.compilation_cache.directory = str(tmp_path / "another_cache")
    elsewhere.data.num_workers = 3
  sweeps.prepare(elsewhere, points, str(tmp_path))

  sweeps.prepare(config, more, str(tmp_path), overwrite=True)
  assert sweep_results.missing_points(str(tmp_path)) == ["freeze_rules-depth_3__seed-0"]
  assert (tmp_path / NAMES[0] / "result.json").exists()  # a finished point is never deleted


def test_a_point_that_had_finished_reports_no_made_up_run_time(tmp_path, config_file,
                                                              monkeypatch):
  """A point whose result.json was lost: training answers `already_finished`."""
  config, points = load(config_file)

  def finished_before(run_config, workdir):
    return {"eval/accuracy": 0.75, "eval/loss": 1.0, "step": run_config.num_train_steps,
            "start": "scratch", "already_finished": True}
  monkeypatch.setattr(loop, "train_and_evaluate", finished_before)
  record = sweeps.run_point(config, points[0], str(tmp_path))
  assert record["wall_seconds"] is None and "already_finished" not in record["metrics"]
  sweeps.prepare(config, points, str(tmp_path))
  (row,) = sweep_results.collect(str(tmp_path))
  assert row.accuracy == 0.75 and math.isnan(row.wall_seconds)


def test_point_out_of_range_says_how_many_points_there_are(config_file):
  _, points = load(config_file)
  assert sweeps.select_point(points, 3).name == NAMES[3]
  for index in (4, -1):
    with pytest.raises(sweeps.SweepError, match=r"this sweep has 4 points, so use 0..3"):
      sweeps.select_point(points, index)


def test_a_missing_pretrained_workdir_fails_before_training(tmp_path, config_file, fake):
  config, points = load(config_file)
  with config.unlocked():
    config.init.weights = str(tmp_path / "not_pretrained_yet")
    config.init.source = "workdir"
  with pytest.raises(sweeps.SweepError, match="not_pretrained_yet.*does not exist"):
    sweeps.run_sweep(config, points, str(tmp_path / "sweep"))
  assert fake.workdirs == []


def test_a_point_can_start_from_an_earlier_point(tmp_path, config_file, fake):
  config, _ = load(config_file)
  points = sweeps.make_points([{"name": "source", "freeze.rules": "depth:0"},
                              {"name": "target", "freeze.rules": "depth:2",
                               "init.weights": "@source"}], config)
  sweeps.run_sweep(config, points, str(tmp_path))
  assert fake.names == ["source", "target"]


def test_the_depth_sweep_config_lists_depths_seeds_and_a_scratch_baseline():
  module = sweeps.load_sweep_module(os.path.join(REPO, "configs", "depth_sweep.py"))
  config = module.get_config()
  config.lock()
  points = sweeps.make_points(module.sweep(), config)
  assert len(points) == 15
  assert points[0].name == "freeze_rules-depth_0__seed-0"
  assert [p.name for p in points[-3:]] == ["scratch__seed-0", "scratch__seed-1",
                                           "scratch__seed-2"]
  assert config.init.source == "workdir" and module.SWEEP_X == "freeze.rules"


def test_list_values_such_as_stages_are_applied_named_and_reported(tmp_path, config_file,
                                                                    monkeypatch):
  config, _ = load(config_file)
  recipe = [{"name": "probe", "steps": 1, "freeze": "linear_probe"},
            {"name": "fine_tune", "steps": 1, "freeze": "none"}]
  points = sweeps.make_points([{"stages": recipe, "seed": seed} for seed in (0, 1)], config)
  assert points[0].name == f"stages-{sweep_results.value_hash(recipe)}__seed-0"
  received = []

  def fake(run_config, workdir):
    received.append([dict(stage) for stage in run_config.stages])
    return {"eval/accuracy": 0.5, "eval/loss": 1.0, "step": 2}

  monkeypatch.setattr(loop, "train_and_evaluate", fake)
  sweeps.run_sweep(config, points, str(tmp_path), x_key="stages")
  assert received == [recipe, recipe]
  with open(tmp_path / "results.csv", newline="") as f:
    assert [json.loads(line["stages"]) for line in csv.DictReader(f)] == [recipe, recipe]
  assert (tmp_path / "accuracy_vs_stages.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
