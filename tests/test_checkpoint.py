"""Tensor bytes and hashes: any tensor PyTorch calls contiguous is hashed by its values alone, whatever
the strides of its size-1 dimensions (a `(n, 1)` factor with stride `(1, n)`, as `shifts[used].T` gives)."""

from __future__ import annotations

import pytest
import torch

from lunar_lens.model.checkpoint import dense, tensor_bytes, tensor_sha256

# tensors PyTorch counts as contiguous although a size-1 dimension has a stride other than the dense one
ODD = {
    "column-of-a-transposed-row": lambda: torch.arange(5.0).reshape(1, 5).T,  # (5, 1), stride (1, 5): the rank-one factor
    "one-element-matrix": lambda: torch.as_strided(torch.arange(25.0), (1, 1), (5, 5), 7),
    "one-element-vector": lambda: torch.as_strided(torch.arange(25.0), (1,), (5,), 3),
    "size-one-middle": lambda: torch.as_strided(torch.arange(6.0), (2, 1, 3), (3, 99, 1)),
    "bfloat16-column": lambda: torch.arange(7.0).to(torch.bfloat16).reshape(1, 7).T,
}


@pytest.mark.parametrize("name", list(ODD))
def test_tensor_bytes_of_a_contiguous_tensor_with_odd_size_one_strides_are_those_of_a_dense_copy(name):
    tensor = ODD[name]()
    assert tensor.is_contiguous()
    copy = tensor.clone(memory_format=torch.contiguous_format)
    expected = copy.numpy().tobytes() if tensor.dtype != torch.bfloat16 else copy.view(torch.int16).numpy().tobytes()
    assert tensor_bytes(tensor) == expected
    assert tensor_sha256(tensor) == tensor_sha256(copy)
    assert dense(tensor).stride() == copy.stride() and torch.equal(dense(tensor), tensor)


def test_a_rank_one_factor_as_the_closed_form_gives_it_is_hashed():
    shifts = torch.randn(1, 8)
    factor = shifts[torch.tensor([True])].T  # (8, 1) with stride (1, 8): what solve_closed's v is
    assert factor.stride() == (1, 8) and factor.is_contiguous()
    assert tensor_bytes(factor) == tensor_bytes(factor.clone(memory_format=torch.contiguous_format))


def test_dense_returns_an_already_dense_tensor_itself_and_copies_nothing():
    tensor = torch.randn(4, 3)
    assert dense(tensor) is tensor
    assert dense(tensor.T).stride() == (4, 1) and torch.equal(dense(tensor.T), tensor.T)  # not contiguous: copied dense
    empty = torch.empty(0, 3).T
    assert tensor_bytes(empty) == b"" and tensor_bytes(torch.tensor(2.0)) == torch.tensor([2.0]).numpy().tobytes()
