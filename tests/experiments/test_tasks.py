"""Tests for experiments.tasks; all offline on small generated data."""

import numpy as np
import pytest

from experiments import data
from experiments.permuted_mnist import tasks


@pytest.fixture(scope="module")
def ds():
  return data.load_synthetic(300, 100, seed=0)


def position_dataset(num_train=100, num_test=20):
  """Every image is the same code image whose pixel k holds k / 784."""
  code = (np.arange(784, dtype=np.float32) / 784).reshape(28, 28)
  return data.Dataset(
    train_x=np.repeat(code[None], num_train, axis=0),
    train_y=(np.arange(num_train) % 10).astype(np.int32),
    test_x=np.repeat(code[None], num_test, axis=0),
    test_y=(np.arange(num_test) % 10).astype(np.int32),
    num_classes=10,
    name="positions",
    description="pixel k holds k / 784",
  )


def decode_permutations(images):
  return np.rint(images.reshape(len(images), 784) * 784).astype(int)


# --- train_val_split -------------------------------------------------------


def test_train_val_split_disjoint_stratified_deterministic():
  y = np.arange(200) % 10
  x = np.arange(200)  # x holds each example's own index.
  train_x, train_y, val_x, val_y = tasks.train_val_split(x, y, 0.1, seed=5)
  assert not set(train_x) & set(val_x) and sorted([*train_x, *val_x]) == list(
    range(200)
  )
  np.testing.assert_array_equal(y[train_x], train_y)
  np.testing.assert_array_equal(np.bincount(val_y), [2] * 10)
  np.testing.assert_array_equal(
    tasks.train_val_split(x, y, 0.1, seed=5)[2], val_x
  )
  assert not np.array_equal(tasks.train_val_split(x, y, 0.1, seed=6)[2], val_x)


def test_train_val_split_bad_fraction():
  with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\)"):
    tasks.train_val_split(np.zeros(10), np.zeros(10), 1.0, seed=0)


# --- permuted --------------------------------------------------------------


def test_permuted_same_seed_identical_different_seed_different(ds):
  a = tasks.permuted_tasks(ds, 3, seed=1)
  b = tasks.permuted_tasks(ds, 3, seed=1)
  c = tasks.permuted_tasks(ds, 3, seed=2)
  for ta, tb, tc in zip(a, b, c, strict=True):
    for field in ("train_x", "val_x", "test_x", "train_y", "val_y"):
      np.testing.assert_array_equal(getattr(ta, field), getattr(tb, field))
    assert not np.array_equal(ta.test_x, tc.test_x)
  assert [t.name for t in a] == ["permuted-0", "permuted-1", "permuted-2"]


def test_permuted_same_permutation_on_train_val_and_test():
  tasks_ = tasks.permuted_tasks(
    position_dataset(), 3, seed=7, first_identity=True
  )
  reference = np.random.default_rng(7).permutation(784)
  np.testing.assert_array_equal(
    decode_permutations(tasks_[0].test_x[:1])[0], np.arange(784)
  )
  for task in tasks_:
    perms = np.concatenate(
      [decode_permutations(x) for x in (task.train_x, task.val_x, task.test_x)]
    )
    assert (
      perms == perms[0]
    ).all()  # One permutation for every image of the task.
    np.testing.assert_array_equal(np.sort(perms[0]), np.arange(784))
  assert not np.array_equal(
    decode_permutations(tasks_[1].test_x[:1]),
    decode_permutations(tasks_[2].test_x[:1]),
  )
  # Task t uses the t-th permutation drawn from default_rng(seed);
  # first_identity replaces only task 0.
  without_identity = tasks.permuted_tasks(position_dataset(), 3, seed=7)
  np.testing.assert_array_equal(
    decode_permutations(without_identity[0].test_x[:1])[0], reference
  )
  np.testing.assert_array_equal(without_identity[2].test_x, tasks_[2].test_x)


def test_permuted_pixel_mapping(ds):
  task = tasks.permuted_tasks(ds, 1, seed=3)[0]
  perm = np.random.default_rng(3).permutation(784)
  # Output pixel k is input pixel perm[k], on test and on train.
  np.testing.assert_array_equal(
    task.test_x.reshape(-1, 784)[:, 5], ds.test_x.reshape(-1, 784)[:, perm[5]]
  )
  train_x = tasks.train_val_split(ds.train_x, ds.train_y, 0.1, seed=3)[0]
  np.testing.assert_array_equal(
    task.train_x.reshape(-1, 784)[:, 5], train_x.reshape(-1, 784)[:, perm[5]]
  )
  np.testing.assert_array_equal(task.test_y, ds.test_y)
  assert task.classes == tuple(range(10)) and task.num_classes == 10


def test_permuted_independent_of_slicing(ds):
  full = tasks.permuted_tasks(ds, 2, seed=4, val_fraction=0.0)
  part = tasks.permuted_tasks(
    ds._replace(train_x=ds.train_x[50:90], train_y=ds.train_y[50:90]),
    2,
    seed=4,
    val_fraction=0.0,
  )
  for f, p in zip(full, part, strict=True):
    np.testing.assert_array_equal(f.train_x[50:90], p.train_x)
  perm = np.random.default_rng(0).permutation(784)
  batches = np.concatenate(
    [
      tasks.permute_pixels(ds.test_x[i : i + 32], perm)
      for i in range(0, 100, 32)
    ]
  )
  np.testing.assert_array_equal(batches, tasks.permute_pixels(ds.test_x, perm))


# --- rotated ---------------------------------------------------------------


def test_rotated_angle_zero_is_identity(ds):
  task = tasks.rotated_tasks(ds, 3, seed=0)[0]
  assert task.name == "rotated-0"
  np.testing.assert_allclose(task.test_x, ds.test_x, atol=1e-6)
  np.testing.assert_array_equal(task.test_y, ds.test_y)


def test_rotated_default_and_given_angles(ds):
  assert [t.name for t in tasks.rotated_tasks(ds, 3, seed=0)] == [
    "rotated-0",
    "rotated-60",
    "rotated-120",
  ]
  assert [
    t.name for t in tasks.rotated_tasks(ds, 2, seed=0, angles=[10, 45])
  ] == ["rotated-10", "rotated-45"]
  with pytest.raises(
    ValueError, match="angles has 1 entries but num_tasks is 2"
  ):
    tasks.rotated_tasks(ds, 2, seed=0, angles=[10])


def test_rotate_90_matches_rot90(ds):
  # About the centre of a 28x28 grid a quarter turn maps pixels onto pixels.
  np.testing.assert_allclose(
    tasks.rotate_images(ds.test_x, 90),
    np.rot90(ds.test_x, 1, axes=(1, 2)),
    atol=1e-5,
  )


# --- split -----------------------------------------------------------------


def test_split_task_incremental(ds):
  stream = tasks.split_tasks(ds, "task", seed=0)
  assert [t.classes for t in stream] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
  for t, task in enumerate(stream):
    for y in (task.train_y, task.val_y, task.test_y):
      assert set(y) == {2 * t, 2 * t + 1}
    assert task.num_classes == 10 and task.name == f"split-{2 * t}{2 * t + 1}"
    assert len(task.test_y) == np.isin(ds.test_y, task.classes).sum()
  # The training data is split once; each class lands in exactly one task.
  assert sum(len(t.train_y) + len(t.val_y) for t in stream) == len(ds.train_y)


def test_split_domain_incremental_maps_labels(ds):
  task_inc = tasks.split_tasks(ds, "task", seed=0)
  domain = tasks.split_tasks(ds, "domain", seed=0)
  for t, (a, b) in enumerate(zip(task_inc, domain, strict=True)):
    assert b.classes == (0, 1) and b.num_classes == 2
    np.testing.assert_array_equal(b.test_x, a.test_x)
    # Even digit -> 0, odd digit -> 1.
    np.testing.assert_array_equal(b.train_y, a.train_y - 2 * t)
    assert set(b.val_y) == {0, 1}


def test_split_errors(ds):
  with pytest.raises(ValueError, match="scenario must be 'task' or 'domain'"):
    tasks.split_tasks(ds, "class", seed=0)
  with pytest.raises(ValueError, match="num_tasks must be in 1..5"):
    tasks.split_tasks(ds, "task", seed=0, num_tasks=6)


# --- make_tasks and validation ---------------------------------------------


@pytest.mark.parametrize(
  ("kind", "names"),
  [
    ("permuted", ["permuted-0", "permuted-1"]),
    ("rotated", ["rotated-0", "rotated-90"]),
    ("split_task", ["split-01", "split-23"]),
    ("split_domain", ["split-01", "split-23"]),
  ],
)
def test_make_tasks(ds, kind, names):
  stream = tasks.make_tasks(kind, ds, 2, seed=0)
  assert [t.name for t in stream] == names
  assert all(
    t.train_x.dtype == np.float32 and t.train_x.shape[1:] == (28, 28)
    for t in stream
  )


def test_make_tasks_unknown_kind(ds):
  with pytest.raises(
    ValueError,
    match="unknown task kind 'shuffled'; valid kinds: permuted, rotated",
  ):
    tasks.make_tasks("shuffled", ds, 2, seed=0)


def test_wrong_image_shape_raises(ds):
  flat = ds._replace(train_x=ds.train_x.reshape(len(ds.train_x), 784))
  with pytest.raises(
    ValueError, match=r"expected images \[N, 28, 28\], got \(300, 784\)"
  ):
    tasks.permuted_tasks(flat, 2, seed=0)
  with pytest.raises(ValueError, match="num_tasks must be at least 1"):
    tasks.permuted_tasks(ds, 0, seed=0)
