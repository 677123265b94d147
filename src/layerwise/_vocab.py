"""mergekit's ``tokenizer_source`` for models whose vocabularies differ: embedding rows re-mapped by token.

Each input's embedding (and head) gets one row per token of the output tokenizer, taken from
the row of that token in the input's own vocabulary. A token an input lacks takes, as
mergekit's ``PermutedEmbeddings`` gives it: the row of the one input that has it, else the
base model's, else the mean of the rows of the inputs that have it; a token no input has is
zero. The merge method then runs on the re-mapped tensors, row for row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = ["permutation", "remap_rows"]


def permutation(out_vocab: Mapping[str, int], vocab: Mapping[str, int], rows: int) -> torch.Tensor:
    """For each output token id, its row in an input with vocabulary ``vocab`` and ``rows`` rows; -1 if absent.

    Example:
        >>> permutation({"a": 0, "b": 1, "c": 2}, {"c": 0, "a": 1}, 2).tolist()
        [1, -1, 0]
    """
    index = torch.full((len(out_vocab),), -1, dtype=torch.long)
    for token, i in out_vocab.items():
        j = vocab.get(token, -1)
        if 0 <= i < len(out_vocab) and 0 <= j < rows:  # a token past the table (padding id) counts as absent
            index[i] = j
    return index


def remap_rows(tensors: Sequence[torch.Tensor], index: Sequence[torch.Tensor], base_at: int | None,
               rows: int | None = None) -> list[torch.Tensor]:
    """Every tensor's rows in the output vocabulary's order (``index[m]`` from :func:`permutation`),
    a token input ``m`` lacks filled as mergekit fills it; ``base_at`` is the base model's position.
    ``rows`` beyond the vocabulary (``pad_to_multiple_of``) get the mean of the tensor's token rows.

    Example:
        >>> a, b = torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0], [5.0]])
        >>> idx = [torch.tensor([0, 1, -1, -1]), torch.tensor([0, -1, 1, -1])]
        >>> [t.flatten().tolist() for t in remap_rows([a, b], idx, None)]
        [[1.0, 2.0, 5.0, 0.0], [3.0, 2.0, 5.0, 0.0]]
    """
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    present = torch.stack([i >= 0 for i in index])  # (inputs, tokens)
    count = present.sum(0)
    width = tensors[0].shape[1:]
    fill: dict[int, torch.Tensor] = {}
    for token in (count < len(tensors)).nonzero().flatten().tolist():
        have = present[:, token].nonzero().flatten().tolist()
        if not have:
            fill[token] = torch.zeros(width, dtype=dtype)
        elif len(have) == 1 or (base_at is not None and base_at in have):
            donor = have[0] if len(have) == 1 else base_at
            fill[token] = tensors[donor][index[donor][token]].to(dtype)
        else:  # summed in input order, then divided, as mergekit
            row = torch.zeros(width, dtype=dtype)
            for m in have:
                row = row + tensors[m][index[m][token]].to(dtype)
            fill[token] = row / len(have)
    out = []
    for t, idx, mine in zip(tensors, index, present):
        new = torch.zeros((max(rows or 0, len(idx)), *width), dtype=dtype)
        new[:len(idx)][mine] = t[idx[mine]].to(dtype)
        for token, row in fill.items():
            if not mine[token]:
                new[token] = row
        new[len(idx):] = new[:len(idx)].mean(0)  # mergekit, after vocab-expansion practice
        out.append(new)
    return out
