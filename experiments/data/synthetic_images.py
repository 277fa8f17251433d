"""Generated class-structured 28x28 images: fast, learnable data for tests."""

import numpy as np

from experiments.data.dataset import IMAGE_SHAPE
from experiments.data.dataset import Dataset
from experiments.data.dataset import make_dataset


def load_synthetic(
  num_train: int = 2000, num_test: int = 500, seed: int = 0
) -> Dataset:
  """Generates learnable 28x28 images for fast tests.

  Each class has a fixed random prototype image; an example is its class
  prototype plus Gaussian noise (std 0.3), clipped and quantised to 8 bits.

  Args:
    num_train: number of training examples (classes balanced up to one).
    num_test: number of test examples.
    seed: seed for prototypes, labels and noise.

  Returns:
    The `Dataset`, named ``"synthetic"``.
  """
  rng = np.random.default_rng(seed)
  prototypes = rng.random((10, *IMAGE_SHAPE))

  def sample(n):
    y = rng.permutation(np.arange(n) % 10)
    x = np.clip(
      prototypes[y] + rng.normal(0.0, 0.3, (n, *IMAGE_SHAPE)), 0.0, 1.0
    )
    return np.round(x * 255), y

  return make_dataset(
    *sample(num_train),
    *sample(num_test),
    name="synthetic",
    description=(
      f"synthetic: 10 random 28x28 prototypes plus Gaussian noise (seed {seed})"
    ),
  )
