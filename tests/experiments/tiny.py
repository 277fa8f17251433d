"""Tiny synthetic datasets, configs and task streams for the runner's tests."""

import functools

from experiments import data
from experiments.permuted_mnist import config as config_lib
from experiments.permuted_mnist import stream as stream_lib
from experiments.permuted_mnist import tasks as tasks_lib


@functools.lru_cache(maxsize=None)
def dataset():
  return data.load_synthetic(num_train=600, num_test=200, seed=0)


def config(**changes):
  """The quick preset shrunk to 3 synthetic tasks, seconds to train."""
  base = config_lib.get_config("quick").replace(
      dataset="synthetic", num_tasks=3, hidden=(16,), batch_size=32,
      eval_batch_size=100, fisher_batch_size=128, progress=False,
      seeds=(0,))
  return base.replace(**changes)


@functools.lru_cache(maxsize=None)
def stream(kind="permuted", num_tasks=3, seed=0):
  tasks = tasks_lib.make_tasks(kind, dataset(), num_tasks, seed)
  return stream_lib.make_stream(tasks, eval_batch_size=100)
