"""One process of a 2-process run on loopback.

See tests/library/test_sharding.py.

Usage: python tests/library/multihost_check.py PROCESS_ID NUM_PROCESSES PORT
Each process has 2 simulated CPU devices; gloo carries the collectives.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
process_id, num_processes, port = map(int, sys.argv[1:4])
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                           num_processes=num_processes,
                           process_id=process_id)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import ewc_jax  # noqa: E402

assert jax.process_count() == num_processes
assert jax.device_count() == 2 * num_processes
mesh = jax.make_mesh((jax.device_count(),), ("data",),
                     axis_types=(jax.sharding.AxisType.Auto,))
replicated = NamedSharding(mesh, P())
rng = np.random.default_rng(0)  # the same data on every process
w = rng.normal(size=(5, 3)).astype(np.float32)
x = rng.normal(size=(32, 5)).astype(np.float32)
y = rng.integers(0, 3, 32).astype(np.int32)
params = jax.device_put({"w": w, "b": np.zeros(3, np.float32)}, replicated)
apply_fn = lambda p, xs: xs @ p["w"] + p["b"]

fisher = ewc_jax.fisher_diagonal(apply_fn, params, (x, y), batch_size=8,
                                 sharding=NamedSharding(mesh, P("data")))
probs = jax.nn.softmax(x @ w)
want = np.asarray((x ** 2).T @ (probs * (1 - probs)) / 32)
got = np.asarray(fisher["w"].addressable_data(0))
np.testing.assert_allclose(got, want, rtol=1e-5)

opt = optax.chain(ewc_jax.ewc(2.0), optax.sgd(1.0))
state = ewc_jax.consolidate(opt.init(params), params, fisher)
moved = jax.tree.map(lambda p: p + 1.0, params)
zeros = jax.tree.map(jnp.zeros_like, params)
updates, _ = jax.jit(opt.update)(zeros, state, moved)
# sgd(1) negates: the update is -lam * F * (moved - anchor) = -2 F.
np.testing.assert_allclose(np.asarray(updates["w"].addressable_data(0)),
                           -2.0 * want, rtol=1e-5)

# A sequence model's Fisher from process-local data: each process holds only
# its own sequences (a host's shard of the old data) and makes the global
# arrays with jax.make_array_from_process_local_data; the Fisher is the
# average over ALL sequences, equal to one process's on the whole data.
V, T = 6, 4
emb = rng.normal(size=(V, 3)).astype(np.float32)
lm = lambda p, t: p["e"][t] @ p["e"].T  # noqa: E731  logits [batch, T, V]
tokens = rng.integers(0, V, (16, T)).astype(np.int32)  # the same everywhere
keep = np.arange(T)[None] < rng.integers(1, T + 1, (16, 1))
local = slice(8 * process_id, 8 * (process_id + 1))  # this host's half
rows = NamedSharding(mesh, P("data"))
glob = tuple(jax.make_array_from_process_local_data(rows, a[local])
             for a in (tokens, keep))
seq_params = jax.device_put({"e": emb}, replicated)
kw = dict(estimator="sampled", rng=jax.random.key(2), batch_size=4)
got = ewc_jax.fisher_diagonal(lm, seq_params, (glob[0], None, glob[1]),
                              sharding=rows, **kw)
local_device = jax.local_devices()[0]
whole = jax.device_put((tokens, None, keep), local_device)
want = ewc_jax.fisher_diagonal(lm, jax.device_put({"e": emb}, local_device),
                               whole, **kw)
np.testing.assert_allclose(np.asarray(got["e"].addressable_data(0)),
                           np.asarray(want["e"]), rtol=1e-5, atol=1e-9)
print(f"ok process {process_id}: multi-host Fisher and pull match; "
      "process-local sequences == one process")
