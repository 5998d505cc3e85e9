"""Tokenizers for reports: SentencePiece (trained on the reports) and WordPiece.

Everything loads from files a run names: local, or a SentencePiece model under a
URL such as ``gs://`` (read through `etils.epath`); nothing is downloaded from a
model hub. A tokenizer is named
by a spec string, so configs can say which one to use:

- ``sp:/path/to/spm.model``: a SentencePiece model (``prepare`` trains one on the
    train split's reports and stores it with the dataset).
- ``wordpiece:/path/to/folder``: a Hugging Face BERT tokenizer folder
    (``vocab.txt`` and optionally ``tokenizer_config.json``), e.g. PubMedBERT's.
- a bare path: ``.model`` files are SentencePiece, folders are WordPiece.

All tokenizers expose the same small interface (``encode``, ``decode``,
``vocab_size`` and the ids of pad, BOS and EOS). NumPy only: no TensorFlow and
no JAX here; the input pipeline wraps ``encode`` into its tokenisation op.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np
from etils import epath

# Special ids of the SentencePiece models that `train_sentencepiece` writes.
SP_PAD_ID, SP_UNK_ID, SP_BOS_ID, SP_EOS_ID = 0, 1, 2, 3


class Tokenizer(Protocol):
    """What the pipeline, decoders and evaluators need of a tokenizer."""

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; stops at the first EOS and skips pad and BOS."""
        ...


def _strip_ids(ids: Sequence[int], pad_id: int, bos_id: int, eos_id: int) -> list[int]:
    out = []
    for i in ids:
        i = int(i)
        if i == eos_id:
            break
        if i not in (pad_id, bos_id):
            out.append(i)
    return out


class SentencePieceTokenizer:
    """A SentencePiece model file. Needs pad, BOS and EOS ids defined in the model."""

    def __init__(self, model_path: str):
        import sentencepiece as spm

        model_file = epath.Path(model_path)  # a local file or a URL (gs://...)
        if not model_file.is_file():
            raise FileNotFoundError(f"SentencePiece model not found: {model_path}")
        self.model_path = model_path
        self._sp = spm.SentencePieceProcessor(model_proto=model_file.read_bytes())
        self.vocab_size = int(self._sp.get_piece_size())
        self.pad_id = int(self._sp.pad_id())
        self.bos_id = int(self._sp.bos_id())
        self.eos_id = int(self._sp.eos_id())
        for name, value in (("pad", self.pad_id), ("bos", self.bos_id), ("eos", self.eos_id)):
            if value < 0:
                raise ValueError(
                    f"SentencePiece model {model_path} defines no {name} id; train it with "
                    "deepcoro_jax.domain.tokenizers.train_sentencepiece or pass "
                    "pad_id/bos_id/eos_id."
                )

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(_strip_ids(ids, self.pad_id, self.bos_id, self.eos_id))


class WordPieceTokenizer:
    """A local Hugging Face BERT tokenizer folder; [CLS] serves as BOS and [SEP] as EOS."""

    def __init__(self, folder: str):
        if not os.path.isfile(os.path.join(folder, "vocab.txt")):
            raise FileNotFoundError(f"WordPiece folder {folder} has no vocab.txt")
        from transformers import BertTokenizerFast

        self.folder = folder
        self._tok = BertTokenizerFast.from_pretrained(folder, local_files_only=True)
        self.vocab_size = int(len(self._tok))
        self.pad_id = int(self._tok.pad_token_id)
        self.bos_id = int(self._tok.cls_token_id)
        self.eos_id = int(self._tok.sep_token_id)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(_strip_ids(ids, self.pad_id, self.bos_id, self.eos_id))


def encode_padded(
    tok: Tokenizer, text: str, max_len: int, *, bos: bool = True, eos: bool = True
) -> tuple[np.ndarray, int]:
    """Text-encoder ids of `text`: [BOS] tokens [EOS], padded with pad_id to `max_len`.

    Long texts lose tokens from the end; BOS and EOS (where asked for) are
    always kept, as BERT does. Returns (ids int32 [max_len], number of real ids).
    """
    specials = int(bos) + int(eos)
    if max_len <= specials:
        raise ValueError(f"encode_padded: max_len={max_len} must exceed the {specials} specials")
    ids = [tok.bos_id] * bos + tok.encode(text)[: max_len - specials] + [tok.eos_id] * eos
    padded = np.full([max_len], tok.pad_id, np.int32)
    padded[: len(ids)] = ids
    return padded, len(ids)


@functools.lru_cache(maxsize=16)
def get_tokenizer(spec: str) -> SentencePieceTokenizer | WordPieceTokenizer:
    """Returns the tokenizer named by `spec` (see the module docstring); cached."""
    kind, sep, path = spec.partition(":")
    if not sep or kind not in ("sp", "wordpiece"):
        kind, path = ("wordpiece" if os.path.isdir(spec) else "sp"), spec
    path = os.path.expanduser(path)
    if kind == "sp":
        return SentencePieceTokenizer(path)
    return WordPieceTokenizer(path)


def train_sentencepiece(
    texts: Iterable[str],
    model_path: str,
    vocab_size: int = 1000,
    *,
    character_coverage: float = 1.0,
) -> str:
    """Trains a unigram SentencePiece model on `texts` and writes it to `model_path`.

    Digits are split into single pieces so that every stenosis percent is spelt
    from the same ten tokens. `vocab_size` is an upper bound: a small corpus of
    templated reports yields fewer pieces, and the model is then smaller.
    Returns `model_path`.
    """
    import sentencepiece as spm

    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("train_sentencepiece: no non-empty texts to train on")
    if not model_path.endswith(".model"):
        raise ValueError(f"model_path must end with .model, got {model_path}")
    os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=model_path[: -len(".model")],
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        model_type="unigram",
        character_coverage=character_coverage,
        split_digits=True,
        pad_id=SP_PAD_ID,
        unk_id=SP_UNK_ID,
        bos_id=SP_BOS_ID,
        eos_id=SP_EOS_ID,
        minloglevel=2,
    )
    return model_path
