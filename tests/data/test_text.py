"""data.text: reading texts, the tokenized dataset's batches, token counts and weights, the augmentation."""

from __future__ import annotations

import gzip

import pytest
import torch

from sttp_compress.data.text import (TokenizedTexts, by_length, perturb_tokens, read_texts,
                                     token_counts, token_weights)
from sttp_compress.errors import UserError


def test_read_texts_skips_blank_lines_and_reads_gzip(tmp_path):
    plain = tmp_path / "t.txt"
    plain.write_text("  first text \n\n\t\nsecond\n", encoding="utf-8")
    assert read_texts(plain) == ["first text", "second"]
    packed = tmp_path / "t.txt.gz"
    with gzip.open(packed, "wt", encoding="utf-8") as f:
        f.write("é one\ntwo\n")
    assert read_texts(packed) == ["é one", "two"]


@pytest.mark.parametrize("content,fragment", [(None, "not found"), ("\n \n", "has no texts")])
def test_read_texts_refuses_missing_and_empty_files(tmp_path, content, fragment):
    path = tmp_path / "t.txt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=fragment):
        read_texts(path)
    with pytest.raises(UserError, match="is a folder"):
        read_texts(tmp_path)




def test_batches_are_padded_to_the_longest_text_with_a_mask():
    data = TokenizedTexts([[101, 5, 6, 102], [101, 7, 102], [101, 102]], pad_id=0)
    batch = data.__getitems__([1, 0])
    assert batch["input_ids"].shape[0] == 2 and batch["input_ids"].shape[1] >= 4
    assert batch["input_ids"][0, :3].tolist() == [101, 7, 102] and batch["input_ids"][1, :4].tolist() == [101, 5, 6, 102]
    assert batch["attention_mask"].sum(1).tolist() == [3, 4]
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()
    assert by_length(data) == [2, 1, 0]


def test_token_counts_and_weights():
    data = TokenizedTexts([[1, 2, 2], [2, 3]])
    assert token_counts(data, 5).tolist() == [0, 1, 3, 1, 0]
    torch.testing.assert_close(token_weights(data, 5, power=0.5),
                               torch.tensor([1.0, 2.0, 4.0, 2.0, 1.0], dtype=torch.float64).sqrt())
    assert token_weights(data, 5, power=0.0).tolist() == [1.0] * 5


def test_perturb_tokens_keeps_the_ends_padding_and_untouched_texts():
    ids = torch.tensor([[101, 5, 6, 7, 8, 102, 0], [101, 9, 10, 11, 102, 0, 0]])
    mask = (ids != 0).long()
    gen = torch.Generator().manual_seed(0)
    out = perturb_tokens(ids, mask, fraction=1.0, prob=1.0, generator=gen)
    assert out.shape == ids.shape
    assert (out[:, 0] == 101).all() and out[0, 5] == 102 and out[1, 4] == 102  # [CLS] and [SEP] stay
    assert (out[mask == 0] == 0).all()  # padding stays
    inner = set(ids[(ids > 0) & (ids < 100)].tolist())
    assert set(out[(out > 0) & (out < 100)].tolist()) <= inner  # replacements come from the batch's own tokens
    untouched = perturb_tokens(ids, mask, fraction=0.0, generator=gen)
    assert torch.equal(untouched, ids)
