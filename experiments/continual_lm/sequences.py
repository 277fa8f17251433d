"""The corpora as token windows: each split's text, then its sequences."""

import hashlib
from typing import Any

import numpy as np

from experiments.continual_lm import corpora
from experiments.continual_lm import tokenizer as tok_lib
from experiments.continual_lm.config import Config


def load_texts(config: Config) -> dict[str, Any]:
  """``{"a": (text, info), "b": ...}``: the corpora, decoded.

  Raises:
    ValueError: a corpus file missing, a directory, unreadable (named).
  """
  out = {}
  for which in ("a", "b"):
    raw, source = corpora.load_corpus(
        getattr(config, f"corpus_{which}"), which, config.corpora,
        config.corpus_bytes, config.code_bytes)
    text = raw.decode("utf-8", errors="replace")
    cut = int(len(text) * (1.0 - config.heldout_fraction))
    half = cut + (len(text) - cut) // 2
    out[which] = ({"train": text[:cut], "val": text[cut:half],
                   "test": text[half:]},
                  {"source": source, "bytes": len(raw),
                   "sha256": hashlib.sha256(raw).hexdigest()})
  return out


def tokenize(config: Config, tok, texts: dict[str, Any]) -> dict[str, Any]:
  """Token windows ``[N, seq_len + 1]`` of every split, and their counts.

  Training windows are shuffled; validation and test ones are a fixed
  random subset of ``eval_sequences`` each.

  Raises:
    ValueError: a split too short (named), or fewer training windows than
      batch_size.
  """
  rng = np.random.default_rng(config.seed)
  data, info = {}, {}
  for which in ("a", "b"):
    parts, meta = texts[which]
    meta = dict(meta)
    for split, text in parts.items():
      name = f"corpus_{which} ({split} part)"
      ids = tok_lib.encode(tok, text)
      seqs = corpora.windows(ids, config.seq_len, name)
      if split == "train":
        if len(seqs) < config.batch_size:
          raise ValueError(
              f"corpus_{which} gives {len(seqs)} training sequences of "
              f"{config.seq_len} tokens, fewer than batch_size "
              f"{config.batch_size}; use a longer text or a smaller "
              "seq_len / batch_size.")
        seqs = seqs[rng.permutation(len(seqs))]
      elif len(seqs) > config.eval_sequences:
        seqs = seqs[np.sort(rng.choice(len(seqs), config.eval_sequences,
                                       replace=False))]
      data[f"{which}_{split}"] = seqs
      meta[f"{split}_tokens"] = int(len(ids))
      meta[f"{split}_sequences"] = int(len(seqs))
    info[which] = meta
  data["info"] = info
  return data
