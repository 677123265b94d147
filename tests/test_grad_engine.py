"""The private gradient engine: per-unit norms for clipping, and primitives of every layout."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.nn.utils import get_total_norm

from layerwise._grad_engine import PRIMITIVES, primitives, to_host, unit_norms


@given(st.lists(st.integers(0, 3), min_size=1, max_size=8), st.sampled_from([1.0, 2.0, 3.0, math.inf]),
       st.sampled_from([None, True, False]), st.integers(0, 2**16))
def test_unit_norms_equal_torchs_total_norm_of_each_unit(units, norm_type, foreach, seed):
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(int(torch.randint(0, 5, (1,), generator=gen)), 3, generator=gen) for _ in units]
    got = unit_norms(grads, units, 4, norm_type, foreach)
    assert got.shape == (4,) and got.dtype == torch.float32
    for unit in range(4):
        members = [g for g, u in zip(grads, units) if u == unit and g.numel()]  # torch refuses empty ones
        want = get_total_norm(members, norm_type) if members else torch.tensor(0.0)
        assert got[unit].item() == pytest.approx(want.item(), rel=1e-6, abs=1e-7)


def test_unit_norms_read_sparse_values_and_complex_magnitudes():
    sparse = torch.sparse_coo_tensor([[0, 0, 2]], [[3.0], [1.0], [4.0]], (5, 1))  # row 0 twice: holds 4
    complex_grad = torch.tensor([3 + 4j, 0j])
    norms = unit_norms([sparse, complex_grad, torch.ones(2)], [0, 1, 1], 2)
    assert norms.tolist() == pytest.approx([math.sqrt(32), math.sqrt(27)])
    assert unit_norms([sparse, complex_grad], [0, 1], 2, math.inf).tolist() == [4.0, 5.0]


def test_primitives_of_a_sparse_gradient_are_those_of_its_dense_form():
    sparse = torch.sparse_coo_tensor([[1, 1, 3]], [[2.0, 0.0], [-1.0, 0.0], [0.0, 5.0]], (4, 2))
    prims = primitives([sparse], ["w"], PRIMITIVES)
    prims.load(to_host(prims.tensors()))
    values = {name: v.item() for name, v in prims.values().items()}
    assert values == pytest.approx({"sumsq": 26.0, "sum": 6.0, "nonzero": 2.0, "max_abs": 5.0}, rel=1e-7)
