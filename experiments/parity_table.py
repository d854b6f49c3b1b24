"""The parity table of every backbone the parity tests ran, from their log.

The parity tests (tests/test_{alexnet,convnext,efficientnet,inception,
xception,vit}.py) append one JSON line per comparison to the file named by
TLFLAX_PARITY_LOG. This script merges the lines of each (model, reference)
pair and prints a Markdown table: relative errors in inference and training
mode, in float32 and float64, the float32 training-mode bound the test used
(see tests/conftest.py), and the model's parameter count (which the tests
check equal to the reference library's), one row per CPU setting the tests
ran under (native, or the imitated CPU of .ci/run).

    TLFLAX_PARITY_LOG=/tmp/parity.jsonl .venv/bin/python -m pytest -m "slow or not slow" \\
        tests/test_{alexnet,convnext,efficientnet,inception,xception,vit}.py -k parity
    .venv/bin/python experiments/parity_table.py /tmp/parity.jsonl
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np

from tlflax import models
from tlflax.weights import merge

COLUMNS = (("inference32", "inference f32"), ("inference64", "inference f64"),
           ("train32", "train f32"), ("train32_bound", "train f32 bound"),
           ("train64", "train f64"))


def read_log(path: str) -> dict[tuple[str, str, str], dict]:
  """{(model, library, CPU setting): figures}, later lines of a key adding to earlier ones."""
  merged: dict[tuple[str, str, str], dict] = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      if line.strip():
        record = json.loads(line)
        key = (record.pop("name"), record.pop("library"), record.pop("cpu", "native"))
        merged.setdefault(key, {}).update(record)
  return merged


def parameter_count(name: str) -> int | None:
  """Trainable parameters of `name` at its default head (None: a test-only model)."""
  if name not in models.model_names():
    return None
  return sum(int(np.prod(shape)) for key, shape in merge.model_shapes(
      models.get_model(name)).items() if key.startswith("params/"))


def table(merged: dict[tuple[str, str, str], dict]) -> str:
  titles = [title for _, title in COLUMNS] + ["parameters"]
  lines = ["| model | reference | CPU | " + " | ".join(titles) + " |",
           "|---" * (len(COLUMNS) + 4) + "|"]
  for (name, library, cpu), figures in sorted(merged.items()):
    cells = [f"{figures[key]:.1e}" if key in figures else "-" for key, _ in COLUMNS]
    count = parameter_count(name)
    cells.append("-" if count is None else f"{count:,}")
    lines.append(f"| {name} | {library} | {cpu} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("log", help="the file TLFLAX_PARITY_LOG named")
  args = parser.parse_args(argv)
  jax.config.update("jax_platforms", "cpu")
  print(table(read_log(args.log)))


if __name__ == "__main__":
  main()
