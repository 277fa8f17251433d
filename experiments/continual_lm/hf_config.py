"""Hugging Face ``config.json`` <-> tunix's Qwen3 ``ModelConfig``.

:func:`read_config` refuses (one line, naming the file or field) what
tunix's Qwen3 cannot honour: another ``model_type``, ``rope_scaling``,
sliding windows, attention biases, another activation, mixtures of experts.
"""

import json
import os
import pathlib
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np

from tunix.models.qwen3 import model as qwen3_model

ModelConfig = qwen3_model.ModelConfig
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_SAFETENSORS_DTYPE = {jnp.dtype("float32"): "float32",
                      jnp.dtype("bfloat16"): "bfloat16"}


class CheckpointError(ValueError):
  """A checkpoint directory or config the model cannot use (one line)."""


_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size",
             "num_hidden_layers", "num_attention_heads")


def config_from_dict(hf: dict[str, Any], *, where: str = "config.json",
                     dtype: str = "float32") -> ModelConfig:
  """tunix's ``ModelConfig`` for a Hugging Face Qwen3 ``config.json``.

  Raises:
    CheckpointError: a field missing or one the model cannot honour, named.
  """
  model_type = hf.get("model_type")
  if model_type != "qwen3":
    raise CheckpointError(
        f"{where}: model_type {model_type!r} is not supported; this "
        "experiment runs the Qwen3 family (model_type 'qwen3').")
  for name in _REQUIRED:
    value = hf.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise CheckpointError(f"{where}: {name} must be a positive int, got "
                            f"{value!r}.")
  refusals = (
      ("rope_scaling", hf.get("rope_scaling") not in (None, {}),
       "RoPE scaling is not implemented by tunix's Qwen3"),
      ("use_sliding_window", bool(hf.get("use_sliding_window", False)),
       "sliding-window attention is not implemented by tunix's Qwen3"),
      ("attention_bias", bool(hf.get("attention_bias", False)),
       "attention biases are not implemented by tunix's Qwen3"),
      ("hidden_act", hf.get("hidden_act", "silu") != "silu",
       "tunix's Qwen3 uses SiLU (SwiGLU) only"),
      ("num_experts", bool(hf.get("num_experts")),
       "mixtures of experts (Qwen3-MoE) are not supported here"),
  )
  for name, bad, why in refusals:
    if bad:
      raise CheckpointError(f"{where}: {name}={hf.get(name)!r}: {why}.")
  heads = hf["num_attention_heads"]
  kv_heads = hf.get("num_key_value_heads", heads)
  if (isinstance(kv_heads, bool) or not isinstance(kv_heads, int)
      or kv_heads < 1 or heads % kv_heads):
    raise CheckpointError(
        f"{where}: num_key_value_heads ({kv_heads!r}) must divide "
        f"num_attention_heads ({heads}).")
  head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
  if head_dim % 2:
    raise CheckpointError(f"{where}: head_dim must be even for RoPE, got "
                          f"{head_dim}.")
  theta = hf.get("rope_theta", 1_000_000)
  eps = hf.get("rms_norm_eps", 1e-6)
  for name, value in (("rope_theta", theta), ("rms_norm_eps", eps)):
    if (isinstance(value, bool) or not isinstance(value, (int, float))
        or not np.isfinite(value) or value <= 0):
      raise CheckpointError(f"{where}: {name} must be a positive number, "
                            f"got {value!r}.")
  return ModelConfig(
      num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"],
      embed_dim=hf["hidden_size"], hidden_dim=hf["intermediate_size"],
      num_heads=heads, head_dim=head_dim, num_kv_heads=kv_heads,
      rope_theta=theta, norm_eps=float(eps),
      use_tied_embedding=bool(hf.get("tie_word_embeddings", False)),
      dtype=DTYPES[dtype], param_dtype=DTYPES[dtype])


def config_to_dict(config: ModelConfig, *, max_positions: int,
                   eos_token_id: Optional[int] = None) -> dict[str, Any]:
  """The Hugging Face ``config.json`` of a Qwen3 ``ModelConfig``."""
  return {
      "architectures": ["Qwen3ForCausalLM"],
      "model_type": "qwen3",
      "vocab_size": config.vocab_size,
      "hidden_size": config.embed_dim,
      "intermediate_size": config.hidden_dim,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": max_positions,
      "rms_norm_eps": config.norm_eps,
      "rope_theta": config.rope_theta,
      "rope_scaling": None,
      "attention_bias": False,
      "attention_dropout": 0.0,
      "use_sliding_window": False,
      "tie_word_embeddings": bool(config.use_tied_embedding),
      "torch_dtype": _SAFETENSORS_DTYPE[jnp.dtype(config.param_dtype)],
      "bos_token_id": eos_token_id,
      "eos_token_id": eos_token_id,
  }


def read_config(model_dir: str | os.PathLike, *,
                dtype: str = "float32") -> tuple[ModelConfig, dict]:
  """``(ModelConfig, the raw dict)`` of ``model_dir/config.json``.

  Raises:
    CheckpointError: no such directory, no ``config.json``, no
      ``*.safetensors``, no ``tokenizer.json``, bad JSON, or a config the
      model cannot honour; one line naming the file or field.
  """
  d = pathlib.Path(model_dir)
  if not d.is_dir():
    raise CheckpointError(f"--model-dir {d}: no such directory.")
  path = d / "config.json"
  if not path.is_file():
    raise CheckpointError(f"--model-dir {d}: no config.json (a Hugging Face "
                          "checkpoint directory has config.json, "
                          "*.safetensors and tokenizer.json).")
  if not list(d.glob("*.safetensors")):
    raise CheckpointError(f"--model-dir {d}: no *.safetensors file.")
  if not (d / "tokenizer.json").is_file():
    raise CheckpointError(f"--model-dir {d}: no tokenizer.json.")
  try:
    hf = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path}: not readable JSON: {e}") from None
  if not isinstance(hf, dict):
    raise CheckpointError(f"{path}: not a JSON object.")
  return config_from_dict(hf, where=str(path), dtype=dtype), hf
