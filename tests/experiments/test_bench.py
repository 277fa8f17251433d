"""The benchmark suite and the device check run end to end, tiny."""

import gzip
import json
import re

import numpy as np
import pytest

from experiments.bench import suite as bench  # noqa: I001
from experiments.bench import common
from experiments.bench import sequence
from experiments.bench import suite  # noqa: F401


@pytest.mark.slow  # an end-to-end run: CI's own step
def test_bench_writes_ratios(tmp_path):
  out = tmp_path / "bench.json"
  bench.main(["--hidden", "16", "--fast-examples", "512", "--vmap-examples",
              "64", "--rss-examples", "0", "--steps", "4", "--reps", "1",
              "--batch-size", "32", "--estimators", "exact,batched",
              "--only", "fisher,memory,train", "--out", str(out)])
  res = json.loads(out.read_text())
  paths = {(r["model"], r["path"], r["estimator"]) for r in res["fisher"]}
  assert ("mlp", "fast", "exact") in paths and ("mlp", "vmap", "exact") in paths
  assert ("mlp", "auto", "batched") not in paths  # batched has no path
  assert ("mlp", "-", "batched") in paths and ("cnn", "fast", "exact") in paths
  assert {r["estimator"] for r in res["fisher"]} == {"exact", "batched"}
  # The recurrent model's scan is one layer of the fast path.
  assert ("recurrent", "fast", "exact") in paths
  assert all(r["ratio"] > 0 and r["ratio_loop"] > 0 for r in res["fisher"])
  assert [r["optimizer"] for r in res["train"]] == ["adam", "ewc+adam"]
  assert {r["batch_size"] for r in res["memory"] if "batch_size" in r} == {
      16, 64, 256}
  assert not any("peak_rss_bytes" in r for r in res["memory"])  # 0 skips


@pytest.mark.slow  # an end-to-end run: CI's own step
def test_sequence_part_times_the_fisher_against_a_train_step():
  rows = sequence.sequence_fisher_ratio(vocab=16, width=8, layers=1, heads=2,
                                        sequences=2, length=4, reps=1,
                                        paths=("auto",))
  assert [r["what"] for r in rows] == ["train step (adam)",
                                       "sequence fisher sampled (auto)"]
  assert rows[0]["ratio_to_train"] == 1.0
  assert all(r["tokens_per_s"] > 0 and r["params"] > 0 for r in rows)


def test_bench_refuses_an_unknown_estimator(capsys):
  with pytest.raises(SystemExit):
    bench.main(["--estimators", "exact,fisherman"])
  assert "--estimators: unknown ['fisherman']" in capsys.readouterr().err


def _write_idx(path, array):
  header = bytes([0, 0, 8, array.ndim]) + b"".join(
      int(s).to_bytes(4, "big") for s in array.shape)
  path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.mark.slow  # an end-to-end run: CI's own step
def test_device_check_smoke_on_cpu_reads_idx(tmp_path, capsys):
  data = tmp_path / "idx"
  data.mkdir()
  rng = np.random.default_rng(0)
  _write_idx(data / "train-images-idx3-ubyte.gz",
             rng.integers(0, 256, (600, 28, 28)))
  _write_idx(data / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 600))
  out = tmp_path / "out"
  bench.main(["--device-check", "--smoke", "--data-dir", str(data),
              "--methods", "", "--out-dir", str(out)])
  printed = capsys.readouterr().out
  assert "no GPU" in printed
  res = json.loads((out / "device_check.json").read_text())
  assert res["examples"] == 512
  assert [r["estimator"] for r in res["fisher"]] == [
      "exact", "sampled", "empirical", "predicted", "batched"]
  assert all(r["ratio"] > 0 for r in res["fisher"])
  # The table is the last thing printed.
  assert printed.rstrip().endswith(res["table"].splitlines()[-1])


@pytest.mark.parametrize("flags,match", [
    # before: tracebacks after minutes of timing, or nothing written while
    # "results written to" was printed (--only)
    (["--reps", "0"], "--reps: must be >= 1"),
    (["--steps", "0"], "--steps: must be >= 1"),
    (["--batch-size", "-5"], "--batch-size: must be >= 0"),
    (["--only", "fisherr"], r"--only: unknown \['fisherr'\]"),
    (["--presets", "nope"], r"--presets: unknown \['nope'\]"),
    (["--device-check", "--methods", "foo"], r"--methods: unknown \['foo'\]"),
])
def test_bench_refuses_bad_flags_before_any_timing(flags, match, capsys):
  with pytest.raises(SystemExit):
    bench.main(flags)
  assert re.search(match, capsys.readouterr().err)


def test_bench_refuses_an_unwritable_out_and_reports_failed_presets(
    tmp_path, capsys, monkeypatch):
  a_file = tmp_path / "file"
  a_file.write_text("")
  with pytest.raises(SystemExit):  # before: a traceback after the 1st part
    bench.main(["--out", str(a_file / "bench.json")])
  assert "is not a writable directory" in capsys.readouterr().err
  monkeypatch.setattr(common, "time_run",
                      lambda argv, timeout=None: (4.7, False, "boom"))
  bench.main(["--only", "presets", "--presets", "quick", "--out",
              str(tmp_path / "b.json")])
  # before: "preset quick: 4.7 s" in the summary, as if it had run
  assert "preset quick: FAILED" in capsys.readouterr().out
