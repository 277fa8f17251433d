"""Small models shared by the tests: NNX and Linen, dense and conv."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx


class NNXMLP(nnx.Module):

  def __init__(self, sizes, rngs, dropout=0.0):
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs)
                            for a, b in zip(sizes[:-1], sizes[1:])])
    self.drop = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for layer in self.layers[:-1]:
      x = self.drop(jax.nn.relu(layer(x)))
    return self.layers[-1](x)


class NNXCNN(nnx.Module):

  def __init__(self, rngs, channels=4, classes=5, side=8):
    self.conv1 = nnx.Conv(1, channels, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(channels, channels, (3, 3), strides=(2, 2),
                          rngs=rngs)
    self.head = nnx.Linear(channels * (side // 2) ** 2, classes, rngs=rngs)

  def __call__(self, x):
    x = x[..., None]
    x = jax.nn.relu(self.conv1(x))
    x = jax.nn.relu(self.conv2(x))
    return self.head(x.reshape(x.shape[0], -1))


class LinenMLP(nn.Module):
  features: tuple = (6, 4)

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for f in self.features[:-1]:
      x = jnp.tanh(nn.Dense(f)(x))
    return nn.Dense(self.features[-1])(x)


class LinenCNN(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(3, (3, 3))(x[..., None])
    x = nn.gelu(x)
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(4)(x)


def nnx_apply(model):
  """(apply_fn, params) for an NNX model in eval mode."""
  model.eval()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return (lambda p, x: nnx.merge(graphdef, p, rest)(x)), params


def linen_apply(module, x, seed=0):
  params = module.init(jax.random.key(seed), x)["params"]
  return (lambda p, xs: module.apply({"params": p}, xs)), params
