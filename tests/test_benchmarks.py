"""The benchmark scripts still run: their main code on a few tiny inputs (no timings asserted)."""

import importlib.util
import os

import pytest


BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "benchmarks")


def load_benchmark(name):
  spec = importlib.util.spec_from_file_location(f"benchmark_{name}",
                                                os.path.join(BENCHMARKS, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_jpeg_decode_benchmark_runs_and_measures_every_decoder(monkeypatch, capsys):
  jpeg_decode = load_benchmark("jpeg_decode")
  # One thread per library is a process-wide setting: keep it out of the test process.
  monkeypatch.setattr(jpeg_decode, "single_threaded", lambda: None)
  results = jpeg_decode.main(["--images", "3", "--size", "160x120", "--large-images", "1",
                              "--large-size", "1024x1024", "--repeats", "1", "--no-shared"])
  assert [title for title, _ in results] == [
      "Generated JPEGs (3, 160x120, q90)", "Generated JPEGs (1, 1024x1024, q90)"]
  for _, rows in results:
    assert [row["decoder"] for row in rows] == list(jpeg_decode.DECODERS)
    for row in rows:
      assert row["eval"] > 0 and row["train"] > 0
      assert 0 < row["eval pixels"] <= 1 and 0 < row["train pixels"] <= 1
    reference = rows[0]
    assert reference["max diff"] == 0 and reference["mean diff"] == 0
  small, large = ({row["decoder"]: row for row in rows} for _, rows in results)
  # A 120 px shorter side has no reduction that keeps 256 px: draft decodes
  # everything, exactly as the full decode does ...
  assert small["PIL draft"]["eval pixels"] == 1
  assert small["PIL draft"]["max diff"] == 0
  # ... while 1024 px keeps 256 px at 1/4: a sixteenth of the pixels.
  assert large["PIL draft"]["eval pixels"] == 1 / 16
  assert large["tf.io.decode_jpeg ratio"]["eval pixels"] == 1 / 16
  assert "| decoder | eval (img/s) |" in capsys.readouterr().out


def test_jpeg_decode_reductions_never_leave_fewer_pixels_than_the_crop_needs():
  jpeg_decode = load_benchmark("jpeg_decode")
  assert jpeg_decode.eval_minimum(500, 375) == (342, 256)
  assert jpeg_decode.largest_factor(500, 375, (342, 256)) == 1
  assert jpeg_decode.largest_factor(1600, 1200, jpeg_decode.eval_minimum(1600, 1200)) == 4
  sizes = [(1600, 1200)] * 50 + [(375, 500)] * 50
  for (width, height), box in zip(sizes, jpeg_decode.training_boxes(sizes)):
    minimum = jpeg_decode.train_minimum(width, height, box)
    factor = jpeg_decode.largest_factor(width, height, minimum)
    _, _, box_height, box_width = box
    # The box, at the reduced size, still has 224 px a side, or the image was not reduced.
    assert factor == 1 or min(box_height, box_width) / factor >= jpeg_decode.CROP
    assert factor == 8 or min(box_height, box_width) / (2 * factor) < jpeg_decode.CROP



def test_gpu_throughput_peaks_by_device_kind_and_ratios_pair_the_right_rows():
  gpu_throughput = load_benchmark("gpu_throughput")
  peak = gpu_throughput.peak_tflops
  # Device kinds as JAX names them; dense bf16 TFLOP/s from NVIDIA's datasheets.
  assert peak("NVIDIA H100 80GB HBM3", None) == 989 and peak("NVIDIA H200", None) == 989
  assert peak("NVIDIA H100 PCIe", None) == 756 and peak("NVIDIA A100-SXM4-80GB", None) == 312
  assert peak("NVIDIA L4", None) == 121 and peak("NVIDIA L40S", None) is None
  assert peak("cpu", None) is None and peak("cpu", 50.0) == 50.0
  rows = [{"framework": framework, "step": step, "data": data_kind,
           "images_per_second": speed, "ms_per_step": 1e3 * 8 / speed}
          for framework, step, data_kind, speed in [
              ("tlflax", "head only", "real", 90.0), ("tlflax", "head only", "synthetic", 100.0),
              ("torch", "head only", "real", 45.0), ("torch", "head only", "synthetic", 60.0)]]
  gpu_throughput.add_ratios(rows, {"head only": 2e12}, peak=10.0)
  tlflax_real, tlflax_synthetic, torch_real, _ = rows
  assert tlflax_real["real_over_synthetic"] == pytest.approx(0.9)
  assert tlflax_real["tlflax_over_torch"] == pytest.approx(2.0)
  assert tlflax_synthetic["tlflax_over_torch"] == pytest.approx(100 / 60)
  assert torch_real["real_over_synthetic"] == pytest.approx(0.75)
  assert torch_real["tlflax_over_torch"] is None
  # 8 images a step at 100 images/s: 12.5 steps/s of 2 TFLOP each, 2.5 times a 10 TFLOP/s peak.
  assert tlflax_synthetic["tflops"] == pytest.approx(25.0)
  assert tlflax_synthetic["peak_fraction"] == pytest.approx(2.5)


# About a minute on 2 cores, most of it XLA compiling two ResNet-18 steps.
@pytest.mark.slow
@pytest.mark.parametrize("engine", ["pil", "dali_cpu"])
def test_gpu_throughput_benchmark_measures_every_row_in_tiny_mode(monkeypatch, capsys, engine):
  if engine != "pil":
    pytest.importorskip("nvidia.dali")
  gpu_throughput = load_benchmark("gpu_throughput")
  # main() sets JAX's share of GPU memory where it is unset: not for the later tests.
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
  rows = gpu_throughput.main(["--tiny", "--engine", engine])
  expected = [(framework, step, data_kind) for framework in ("tlflax", "torch")
              for step, _ in gpu_throughput.STEP_KINDS for data_kind in ("real", "synthetic")]
  assert [(row["framework"], row["step"], row["data"]) for row in rows] == expected
  for row in rows:
    assert row["images_per_second"] > 0 and row["tflops"] > 0
    assert row["peak_fraction"] is None  # a CPU has no bf16 peak
  flops = {row["step"]: row["gflop_per_step"] for row in rows}
  # Nothing is back-propagated through the frozen backbone.
  assert flops["head only"] < 0.5 * flops["full fine-tuning"]
  out = capsys.readouterr().out
  for framework, step, data_kind in expected:
    assert f"| {framework} | {step} | {data_kind} |" in out
  assert "| images/s | ms/step |" in out and "| unknown |" in out
  assert "tlflax head only: real / synthetic = " in out
  assert ("batches made by NVIDIA DALI (data.engine='dali_cpu'" in out) == (engine != "pil")


@pytest.mark.slow  # starts TensorFlow, PyTorch and Grain's worker processes
def test_input_pipeline_benchmark_measures_every_loader(capsys):
  input_pipeline = load_benchmark("input_pipeline")
  results, ratios = input_pipeline.main(["--images", "64", "--repeats", "1",
                                         "--scaling-rounds", "1", "--no-shared"])
  ((title, rows),) = results
  assert title == "Generated JPEGs (64, about 500x375, q90)"
  cores = os.cpu_count() or 1
  assert [(row["transform"], row["workers"]) for row in rows] == [
      (transform, workers) for transform in ("train", "eval") for workers in sorted({1, cores})]
  loaders = ["tlflax", "tf.data", "torch", "tf.data, no antialias"]
  if input_pipeline.dali_installed():
    loaders.append("DALI (CPU)")
  for row in rows:
    assert sorted(row) == sorted(loaders + ["transform", "workers"])
    for loader in loaders:
      assert row[loader] > 0, (row, loader)
  assert all(len(values) == 1 and values[0] > 0 for values in ratios.values()) and (
      sorted(ratios) == (["eval", "train"] if cores > 1 else []))
  out = capsys.readouterr().out
  assert "| tlflax / tf.data |" in out
  if cores > 1:
    assert f"tlflax train, {cores} worker(s): the main process and its workers used " in out
