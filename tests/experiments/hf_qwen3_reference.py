"""An independent NumPy forward pass of Hugging Face's Qwen3.

Written from the Hugging Face architecture (``Qwen3ForCausalLM``), not from
tunix's code: it reads the checkpoint's tensors by their Hugging Face names
in their layouts (``weight`` is ``[out, in]``, applied as ``x @ W.T``),
rotate-half RoPE with ``inv_freq = theta ** (-arange(0, d, 2) / d)``,
RMSNorm on the hidden states and, per head, on queries and keys before RoPE,
grouped-query attention by repeating the key/value heads, a causal softmax
scaled by ``head_dim ** -0.5``, SwiGLU ``down(silu(gate(x)) * up(x))``, a
final norm and the (tied or not) output projection. float64 throughout.
"""

import json
import pathlib

import numpy as np


def _rms_norm(x, w, eps):
  return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def _rotate_half(x):
  half = x.shape[-1] // 2
  return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _silu(x):
  return x / (1.0 + np.exp(-x))


def logits(model_dir, tokens):
  """Logits ``[B, T, V]`` of the checkpoint in ``model_dir`` on ``tokens``."""
  from safetensors.numpy import load_file

  model_dir = pathlib.Path(model_dir)
  cfg = json.loads((model_dir / "config.json").read_text())
  w = {}
  for f in sorted(model_dir.glob("*.safetensors")):
    w.update({k: v.astype(np.float64) for k, v in load_file(f).items()})
  eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
  nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
  hd = cfg.get("head_dim") or cfg["hidden_size"] // nh
  tokens = np.asarray(tokens)
  b, t = tokens.shape
  x = w["model.embed_tokens.weight"][tokens]                  # [B, T, D]
  inv_freq = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
  freqs = np.arange(t, dtype=np.float64)[:, None] * inv_freq[None, :]
  emb = np.concatenate([freqs, freqs], axis=-1)               # [T, hd]
  cos, sin = np.cos(emb)[None, None], np.sin(emb)[None, None]
  causal = np.tril(np.ones((t, t), bool))
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}."
    h = _rms_norm(x, w[p + "input_layernorm.weight"], eps)
    q = (h @ w[p + "self_attn.q_proj.weight"].T).reshape(b, t, nh, hd)
    k = (h @ w[p + "self_attn.k_proj.weight"].T).reshape(b, t, nkv, hd)
    v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(b, t, nkv, hd)
    q = _rms_norm(q, w[p + "self_attn.q_norm.weight"], eps)
    k = _rms_norm(k, w[p + "self_attn.k_norm.weight"], eps)
    q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))   # [B, H, T, hd]
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    k, v = (np.repeat(a, nh // nkv, axis=1) for a in (k, v))
    scores = q @ k.transpose(0, 1, 3, 2) * hd ** -0.5
    scores = np.where(causal, scores, -np.inf)
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    attn = (scores / scores.sum(-1, keepdims=True)) @ v       # [B, H, T, hd]
    attn = attn.transpose(0, 2, 1, 3).reshape(b, t, nh * hd)
    x = x + attn @ w[p + "self_attn.o_proj.weight"].T
    h = _rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
    gate = h @ w[p + "mlp.gate_proj.weight"].T
    up = h @ w[p + "mlp.up_proj.weight"].T
    x = x + (_silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
  x = _rms_norm(x, w["model.norm.weight"], eps)
  head = (w["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings")
          else w["lm_head.weight"])
  return x @ head.T
