"""Tokenizers: SentencePiece training and round trips, WordPiece from a local folder."""

import os

import pytest

from deepcoro_jax.domain import tokenizers

REPORTS = [
    "Right dominant circulation. Severe 80% stenosis of the proximal LAD.",
    "Left dominant circulation. Mild 30% stenosis of the mid RCA.",
    "Codominant circulation. Chronic total occlusion of the distal LCx with collaterals.",
    "No significant coronary artery disease.",
] * 5


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sp") / "spm.model")
    return tokenizers.train_sentencepiece(REPORTS, path, vocab_size=120)


def test_sentencepiece_round_trip_and_special_ids(sp_model):
    tok = tokenizers.get_tokenizer("sp:" + sp_model)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (
        tokenizers.SP_PAD_ID,
        tokenizers.SP_BOS_ID,
        tokenizers.SP_EOS_ID,
    )
    for text in REPORTS[:4]:
        ids = tok.encode(text)
        assert tok.pad_id not in ids and tok.eos_id not in ids
        assert tok.decode(ids) == text
        # decode stops at EOS and ignores BOS and padding.
        assert tok.decode([tok.bos_id, *ids, tok.eos_id, 17, tok.pad_id]) == text


def test_sentencepiece_splits_digits(sp_model):
    tok = tokenizers.get_tokenizer(sp_model)  # a bare .model path means SentencePiece
    pieces = [p for p in (tok.decode([i]) for i in tok.encode("80%")) if p]
    assert pieces[:2] == ["8", "0"]


def test_bad_specs_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        tokenizers.get_tokenizer("sp:" + str(tmp_path / "nope.model"))
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        tokenizers.get_tokenizer("wordpiece:" + str(tmp_path))
    with pytest.raises(ValueError, match="no non-empty texts"):
        tokenizers.train_sentencepiece(["", "  "], str(tmp_path / "x.model"))


def test_wordpiece_from_local_folder(tmp_path):
    vocab = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "severe",
        "stenosis",
        "of",
        "the",
        "lad",
        "##s",
        "80",
        "%",
        ".",
    ]
    with open(os.path.join(tmp_path, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    tok = tokenizers.get_tokenizer(str(tmp_path))
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 2, 3, len(vocab))
    ids = tok.encode("Severe stenosis of the LAD.")
    assert [vocab[i] for i in ids] == ["severe", "stenosis", "of", "the", "lad", "."]
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == "severe stenosis of the lad."
