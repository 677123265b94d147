"""Embedding rows re-mapped by token, as mergekit's PermutedEmbeddings fills them."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from layerwise._vocab import permutation, remap_rows


def test_a_missing_token_takes_the_base_row_else_the_mean_of_its_holders():
    a, b, base = torch.tensor([[1.0], [2.0]]), torch.tensor([[4.0], [8.0]]), torch.tensor([[16.0], [32.0]])
    # token 0: everyone has it; token 1: b and base (base wins over b); token 2: a and b, not base (mean)
    index = [torch.tensor([0, -1, 1]), torch.tensor([0, 1, 0]), torch.tensor([0, 1, -1])]
    out = remap_rows([a, b, base], index, base_at=2)
    assert [t.flatten().tolist() for t in out] == [[1.0, 32.0, 2.0], [4.0, 8.0, 4.0], [16.0, 32.0, 3.0]]
    out = remap_rows([a, b, base], index, base_at=None)  # no base: token 1 is the mean of b's and base's rows
    assert out[0].flatten().tolist() == [1.0, 20.0, 2.0]


def test_a_token_beyond_a_models_rows_counts_as_absent():
    assert permutation({"x": 0, "y": 1}, {"x": 5, "y": 0}, rows=4).tolist() == [-1, 0]


@settings(max_examples=40, deadline=None)
@given(st.permutations(range(6)), st.integers(1, 3))
def test_a_reordered_vocabulary_is_its_rows_reordered(order, width):
    vocab = {f"t{i}": i for i in range(6)}
    theirs = {f"t{i}": j for i, j in zip(range(6), order)}
    rows = torch.randn(6, width)
    (got,) = remap_rows([rows], [permutation(vocab, theirs, 6)], None)
    assert torch.equal(got, rows[list(order)])
