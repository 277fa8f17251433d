"""Tokenizers: a byte-level BPE trained here, or a checkpoint's own.

Hugging Face ``tokenizers`` (the Rust library behind ``transformers``): the
offline default trains a byte-level BPE on the corpora (every byte is in
the alphabet, so any text round-trips) and saves ``tokenizer.json`` into
the checkpoint directory; a user's checkpoint brings its ``tokenizer.json``
and is read the same way (:func:`load`).
"""

import os
import pathlib
import re
from typing import Iterable

import numpy as np

EOS = "<|endoftext|>"


def train(texts: Iterable[str], vocab_size: int):
  """A byte-level BPE of ``vocab_size`` tokens (``EOS`` included).

  Deterministic for the same texts and version of ``tokenizers``.
  """
  from tokenizers import Tokenizer  # noqa: PLC0415 (the lm extra)
  from tokenizers import decoders, models, pre_tokenizers, trainers  # noqa

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer=trainer)
  return tok


def load(path: str | os.PathLike):
  """The tokenizer of a ``tokenizer.json``.

  Raises:
    ValueError: the file is not a tokenizer (named).
  """
  from tokenizers import Tokenizer  # noqa: PLC0415 (the lm extra)

  try:
    return Tokenizer.from_file(str(path))
  except Exception as e:  # tokenizers raises a bare Exception
    raise ValueError(f"{path}: not a tokenizer.json: "
                     f"{' '.join(str(e).split())[:200]}") from None


def save(tok, path: str | os.PathLike) -> pathlib.Path:
  """Writes ``tokenizer.json`` atomically."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp")
  tok.save(str(tmp))
  os.replace(tmp, path)
  return path


# A place where a GPT-2-style byte-level pre-tokenizer splits whatever
# comes before and after: a single space or newline between two non-spaces
# (the space then starts the next word, the newline is a token alone).
_CUT = re.compile(r"(?<=\S)[ \n](?=\S)")


def encode(tok, text: str, *, chunk_chars: int = 1 << 16) -> np.ndarray:
  """The token ids of ``text`` (int32), encoded in parallel chunks.

  Chunks are cut only where the byte-level pre-tokenizer splits anyway
  (`_CUT`), so the ids are those of the whole text; a chunk without such a
  place grows until one comes.
  """
  pieces, start = [], 0
  while start < len(text):
    end = start + chunk_chars
    if end < len(text):
      back = [m.start() for m in _CUT.finditer(text, start + 1, end)]
      if back:
        end = back[-1]
      else:
        ahead = _CUT.search(text, end)
        end = ahead.start() if ahead else len(text)
    end = min(end, len(text))
    pieces.append(text[start:end])
    start = end
  ids = [e.ids for e in tok.encode_batch(pieces, add_special_tokens=False)]
  if not ids:
    return np.zeros([0], np.int32)
  return np.concatenate([np.asarray(x, np.int32) for x in ids])


def decode(tok, ids) -> str:
  return tok.decode([int(i) for i in ids], skip_special_tokens=False)


def eos_id(tok):
  """The id of ``EOS`` (or of a checkpoint's ``<|endoftext|>``), or None."""
  return tok.token_to_id(EOS)
