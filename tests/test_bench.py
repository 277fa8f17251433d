"""The benchmark suite runs end to end on a tiny configuration."""

import json

from experiments import bench


def test_bench_writes_ratios(tmp_path):
  out = tmp_path / "bench.json"
  bench.main(["--hidden", "16", "--fast-examples", "512", "--vmap-examples",
              "64", "--rss-examples", "256", "--steps", "4", "--reps", "1",
              "--batch-size", "32", "--presets", "", "--out", str(out)])
  res = json.loads(out.read_text())
  paths = {(r["model"], r["path"], r["estimator"]) for r in res["fisher"]}
  assert ("mlp", "fast", "exact") in paths and ("mlp", "vmap", "exact") in paths
  # The recurrent model is not known to the fast path: auto fell back.
  assert ("recurrent", "vmap", "exact") in paths
  assert all(r["ratio"] > 0 for r in res["fisher"])
  assert [r["optimizer"] for r in res["train"]] == ["adam", "ewc+adam"]
  assert {r["batch_size"] for r in res["memory"] if "batch_size" in r} == {
      16, 64, 256}
