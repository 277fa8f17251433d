"""Qwen3, the experiment's model family: Hugging Face checkpoints on tunix.

The model is tunix's Flax NNX implementation of Qwen3
(``tunix.models.qwen3``); this module is the glue a user's checkpoint goes
through, and so does the offline default's:

* :mod:`hf_config` turns a Hugging Face ``config.json`` into tunix's
  ``ModelConfig`` and back, refusing (one line, naming the field) what
  tunix's Qwen3 cannot honour.
* :func:`load` builds the model from a checkpoint directory
  (``config.json``, ``*.safetensors``, ``tokenizer.json``) with tunix's
  ``create_model_from_safe_tensors``, optionally sharded over a mesh.
* :func:`save` writes a model back in that format (Hugging Face tensor
  names and layouts), atomically, so that the offline default's pretrained
  model and every fine-tuned one load like a downloaded checkpoint.
* tunix 0.1.7's ``Attention.block`` calls ``apply_rope`` without the
  config's ``rope_theta``, so its default 1e6 is always used (Qwen3-4B-2507
  says 5e6). :func:`patch_rope_theta` makes every call without an explicit
  theta use the config's; tests compare the logits with an independent
  NumPy forward pass of Hugging Face's Qwen3 at rope_theta 1e4 and 1e6.

Why Qwen3 and not Llama 3: Qwen3 has checkpoints small enough for one
consumer GPU (0.6B, 1.7B) with tied embeddings, q/k norms that make it the
stricter test of an implementation, and tunix's presets for the whole
family; its Llama 3 code has the same rope_theta bug.
"""

import contextvars
import dataclasses
import functools
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tunix.models.qwen3 import model as qwen3_model  # noqa: I001
from tunix.models.qwen3 import params as qwen3_params

from experiments.continual_lm.hf_config import DTYPES
from experiments.continual_lm.hf_config import CheckpointError
from experiments.continual_lm.hf_config import ModelConfig
from experiments.continual_lm.hf_config import config_to_dict
from experiments.continual_lm.hf_config import read_config

Qwen3 = qwen3_model.Qwen3


# --- rope_theta -------------------------------------------------------------

_THETA = contextvars.ContextVar("rope_theta", default=None)


def patch_rope_theta() -> None:
  """Makes tunix's Qwen3 attention use its config's ``rope_theta``.

  ``Attention.block`` is wrapped to publish ``self.config.rope_theta`` while
  it runs (at trace time), and the module's ``apply_rope`` to take it when
  called without one. An explicit ``rope_theta`` (a fixed tunix) wins, so
  the patch is harmless there. Idempotent.
  """
  if getattr(qwen3_model.apply_rope, "_ewc_jax_patched", False):
    return
  original_rope = qwen3_model.apply_rope
  original_block = qwen3_model.Attention.block

  @functools.wraps(original_rope)
  def apply_rope(inputs, positions, head_dim, rope_theta=None):
    if rope_theta is None:
      rope_theta = _THETA.get()
    if rope_theta is None:
      return original_rope(inputs, positions, head_dim)
    return original_rope(inputs, positions, head_dim, rope_theta=rope_theta)

  @functools.wraps(original_block)
  def block(self, *args, **kwargs):
    token = _THETA.set(self.config.rope_theta)
    try:
      return original_block(self, *args, **kwargs)
    finally:
      _THETA.reset(token)

  apply_rope._ewc_jax_patched = True
  qwen3_model.apply_rope = apply_rope
  qwen3_model.Attention.block = block


patch_rope_theta()


# --- parameters --------------------------------------------------------------


def init_params(config: ModelConfig, seed: int, *, std: float = 0.02) -> Any:
  """A fresh model's ``nnx.State`` of Params, initialised as Hugging Face's.

  tunix's constructor zero-initialises the MLP (meant to be overwritten by a
  checkpoint), which would never train: every matrix is drawn from
  ``N(0, std^2)`` (HF's ``initializer_range``), every norm weight is 1.
  """
  model = nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(seed)))
  _, abstract = nnx.split(model, nnx.Param)
  key = jax.random.key(seed)
  leaves, treedef = jax.tree.flatten_with_path(abstract)
  out = []
  for i, (path, leaf) in enumerate(leaves):
    name = jax.tree_util.keystr(path)
    if "norm" in name:
      out.append(jnp.ones(leaf.shape, leaf.dtype))
    else:
      out.append((std * jax.random.normal(jax.random.fold_in(key, i),
                                          leaf.shape)).astype(leaf.dtype))
  return jax.tree.unflatten(treedef, out)


def build(config: ModelConfig, params: Any = None) -> nnx.Module:
  """A tunix Qwen3 module holding ``params`` (an ``nnx.State`` of Params)."""
  model = nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(0)))
  graphdef, abstract, rest = nnx.split(model, nnx.Param, ...)
  if params is None:
    params = init_params(config, 0)
  return nnx.merge(graphdef, params, rest)


def load(model_dir: str | os.PathLike, *, dtype: str = "float32",
         mesh: Optional[jax.sharding.Mesh] = None
         ) -> tuple[nnx.Module, ModelConfig, dict]:
  """The model of a Hugging Face checkpoint directory, through tunix.

  Returns:
    ``(model, config, raw config.json)``.

  Raises:
    CheckpointError: as :func:`read_config`, or tensors that do not fit
      the config (tunix's message, on one line).
  """
  config, hf = read_config(model_dir, dtype=dtype)
  check_tensors(model_dir, config)
  try:
    model = qwen3_params.create_model_from_safe_tensors(
        str(model_dir), config, mesh=mesh, dtype=DTYPES[dtype])
  except (ValueError, RuntimeError, KeyError) as e:
    raise CheckpointError(
        f"--model-dir {model_dir}: the tensors do not fit config.json: "
        f"{' '.join(str(e).split())[:300]}") from None
  return model, config, hf


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
  """The Hugging Face tensor names and shapes of a Qwen3 ``config``."""
  d, f, hd = config.embed_dim, config.hidden_dim, config.head_dim
  h, kv = config.num_heads, config.num_kv_heads
  out = {"model.embed_tokens.weight": (config.vocab_size, d),
         "model.norm.weight": (d,)}
  for i in range(config.num_layers):
    p = f"model.layers.{i}."
    out |= {p + "self_attn.q_proj.weight": (h * hd, d),
            p + "self_attn.k_proj.weight": (kv * hd, d),
            p + "self_attn.v_proj.weight": (kv * hd, d),
            p + "self_attn.o_proj.weight": (d, h * hd),
            p + "self_attn.q_norm.weight": (hd,),
            p + "self_attn.k_norm.weight": (hd,),
            p + "mlp.gate_proj.weight": (f, d),
            p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,)}
  if not config.use_tied_embedding:
    out["lm_head.weight"] = (config.vocab_size, d)
  return out


def check_tensors(model_dir: str | os.PathLike, config: ModelConfig) -> None:
  """Refuses a checkpoint whose tensors miss or misfit its ``config.json``.

  tunix would keep its own initialisation for a missing tensor (zeros for
  the MLP) or fail deep inside its loader; the headers are read only.

  Raises:
    CheckpointError: the first missing or misshapen tensor, named.
  """
  from safetensors import safe_open  # noqa: PLC0415 (the lm extra)

  found = {}
  for path in sorted(pathlib.Path(model_dir).glob("*.safetensors")):
    try:
      with safe_open(str(path), framework="numpy") as f:
        for name in f.keys():
          found[name] = tuple(f.get_slice(name).get_shape())
    except Exception as e:  # safetensors raises its own SafetensorError
      raise CheckpointError(f"{path}: not a safetensors file: "
                            f"{' '.join(str(e).split())[:200]}") from None
  want = expected_shapes(config)
  missing = [n for n in want if n not in found]
  if missing:
    raise CheckpointError(
        f"--model-dir {model_dir}: tensor {missing[0]} is missing "
        f"({len(missing)} missing in all).")
  for name, shape in want.items():
    if found[name] != shape:
      raise CheckpointError(
          f"--model-dir {model_dir}: tensor {name} has shape "
          f"{found[name]}, config.json implies {shape}.")


def _hf_tensors(params: Any, config: ModelConfig) -> dict[str, np.ndarray]:
  """The Hugging Face tensors (name -> array, HF layout) of ``params``."""
  p = params.to_pure_dict() if hasattr(params, "to_pure_dict") else params
  d, h, kv, hd = (config.embed_dim, config.num_heads, config.num_kv_heads,
                  config.head_dim)
  arr = lambda x: np.asarray(jax.device_get(x))  # noqa: E731
  out = {"model.embed_tokens.weight": arr(p["embedder"]["input_embedding"]),
         "model.norm.weight": arr(p["final_norm"]["w"])}
  for i in range(config.num_layers):
    layer = p["layers"][i]
    attn, mlp = layer["attn"], layer["mlp"]
    pre = f"model.layers.{i}."
    out[pre + "self_attn.q_proj.weight"] = arr(attn["q_proj"]["w"]).reshape(
        d, h * hd).T
    out[pre + "self_attn.k_proj.weight"] = arr(attn["k_proj"]["w"]).reshape(
        d, kv * hd).T
    out[pre + "self_attn.v_proj.weight"] = arr(attn["v_proj"]["w"]).reshape(
        d, kv * hd).T
    out[pre + "self_attn.o_proj.weight"] = arr(attn["o_proj"]["w"]).reshape(
        h * hd, d).T
    out[pre + "self_attn.q_norm.weight"] = arr(attn["q_norm"]["w"])
    out[pre + "self_attn.k_norm.weight"] = arr(attn["k_norm"]["w"])
    for name in ("gate_proj", "up_proj", "down_proj"):
      out[pre + f"mlp.{name}.weight"] = arr(mlp[name]["kernel"]).T
    out[pre + "input_layernorm.weight"] = arr(layer["input_layernorm"]["w"])
    out[pre + "post_attention_layernorm.weight"] = arr(
        layer["post_attention_layernorm"]["w"])
  if not config.use_tied_embedding:
    out["lm_head.weight"] = arr(p["lm_head"]["w"]).T
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def save(out_dir: str | os.PathLike, params: Any, config: ModelConfig, *,
         tokenizer_json: str | os.PathLike, max_positions: int,
         eos_token_id: Optional[int] = None) -> pathlib.Path:
  """Writes a Hugging Face Qwen3 checkpoint directory, atomically.

  ``config.json``, ``model.safetensors`` (HF names and layouts) and a copy
  of ``tokenizer_json`` are written into a temporary sibling directory that
  then replaces ``out_dir``: a crash leaves the old directory or none.

  Returns:
    ``out_dir`` as a path.
  """
  from safetensors.numpy import save_file  # noqa: PLC0415 (the lm extra)

  out_dir = pathlib.Path(out_dir)
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.",
                                      dir=out_dir.parent))
  try:
    tensors = _hf_tensors(params, config)
    save_file(tensors, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config_to_dict(
        config, max_positions=max_positions, eos_token_id=eos_token_id),
        indent=2) + "\n")
    shutil.copyfile(tokenizer_json, tmp / "tokenizer.json")
    if out_dir.exists():
      old = out_dir.with_name(f".{out_dir.name}.old")
      shutil.rmtree(old, ignore_errors=True)
      out_dir.rename(old)
      tmp.rename(out_dir)
      shutil.rmtree(old, ignore_errors=True)
    else:
      tmp.rename(out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out_dir


def num_params(params: Any) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(params)))


# --- the forward pass --------------------------------------------------------


def make_apply_fn(graphdef: Any, rest: Any = None):
  """``apply_fn(params, tokens[B, T]) -> logits[B, T, V]`` (float32).

  Causal attention over every position (no padding), positions 0..T-1.
  """

  def apply_fn(params, tokens):
    parts = (params,) if rest is None else (params, rest)
    model = nnx.merge(graphdef, *parts)
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), jnp.bool_)), (b, t, t))
    logits, _ = model(tokens, positions, None, mask)
    return logits.astype(jnp.float32)

  return apply_fn


@dataclasses.dataclass(frozen=True)
class Split:
  """A model taken apart: ``apply_fn(trainable, tokens)`` and the pieces.

  ``trainable`` are the Params (full fine-tuning) or the LoRAParams (with
  LoRA, the base weights being frozen inside ``rest``).
  """

  graphdef: Any
  trainable: Any
  rest: Any

  def apply_fn(self):
    return make_apply_fn(self.graphdef, self.rest)

  def merge(self, trainable: Any) -> nnx.Module:
    return nnx.merge(self.graphdef, trainable, self.rest)


def split(model: nnx.Module, *, lora: bool = False) -> Split:
  """``Split`` of ``model`` by what fine-tuning trains."""
  graphdef, trainable, rest = nnx.split(
      model, nnx.LoRAParam if lora else nnx.Param, ...)
  return Split(graphdef, trainable, rest)


def with_lora(model: nnx.Module, *, rank: int, alpha: float, seed: int,
              pattern: str = ".*(q_proj|k_proj|v_proj|o_proj|gate_proj|"
                             "up_proj|down_proj)") -> nnx.Module:
  """``model`` with qwix LoRA adapters on its projections (B starts at 0)."""
  import qwix  # noqa: PLC0415 (the lm extra)

  provider = qwix.LoraProvider(module_path=pattern, rank=rank, alpha=alpha)
  tokens = jnp.zeros((1, 4), jnp.int32)
  positions = jnp.arange(4, dtype=jnp.int32)[None]
  mask = jnp.tril(jnp.ones((4, 4), jnp.bool_))[None]
  return qwix.apply_lora_to_model(model, provider, tokens, positions, None,
                                  mask, rngs=nnx.Rngs(seed))


def make_mesh(spec: Optional[str]) -> Optional[jax.sharding.Mesh]:
  """A ``("fsdp", "tp")`` mesh from ``"FSDPxTP"`` (e.g. ``"4x2"``); None.

  ``"auto"`` puts every local device on ``fsdp``.

  Raises:
    ValueError: a spec that is not ``AxB`` or whose product is not the
      number of local devices (named ``--mesh``).
  """
  if spec is None:
    return None
  n = jax.local_device_count()
  if spec == "auto":
    shape = (n, 1)
  else:
    try:
      shape = tuple(int(x) for x in spec.lower().split("x"))
    except ValueError:
      shape = ()
    if len(shape) != 2 or min(shape) < 1:
      raise ValueError(f"--mesh {spec!r}: expected FSDPxTP, e.g. 2x1, or "
                       "auto.")
    if shape[0] * shape[1] != n:
      raise ValueError(f"--mesh {spec}: {shape[0] * shape[1]} devices, but "
                       f"{n} are present.")
  # Auto axes: the compiler propagates tunix's annotations (explicit axes
  # would ask every gather for an output sharding).
  return jax.make_mesh(shape, ("fsdp", "tp"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
