"""The LM cache's GrowingLayer (vlm/session.py): the same keys and values as transformers'
DynamicLayer, appended in place instead of by concatenation."""

import torch
from transformers.cache_utils import DynamicLayer

from vlm.session import GrowingLayer


def _kv(rows, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 3, n, 8, generator=g), torch.randn(rows, 3, n, 8, generator=g)


def test_a_growing_layer_holds_what_a_dynamic_layer_holds_through_growth_crops_and_reorders():
    grow, plain = GrowingLayer(), DynamicLayer()
    steps = [("feed", 37)] + [("feed", 1)] * 70 + [("crop", -17), ("feed", 3), ("reorder", None), ("feed", 1)]
    rows = 4
    for k, (what, n) in enumerate(steps):
        for layer in (grow, plain):
            if what == "feed":
                out = layer.update(*_kv(rows, n, k))
            elif what == "crop":
                layer.crop(n)
            else:
                layer.batch_select_indices(torch.tensor([2, 0, 3]))
        rows = 3 if what == "reorder" else rows
        if what == "feed":
            assert torch.equal(out[0], plain.keys) and torch.equal(out[1], plain.values)
        assert torch.equal(grow.keys, plain.keys) and torch.equal(grow.values, plain.values), (k, what)
    assert grow.keys.shape == (3, 3, 94, 8)


def test_a_step_writes_into_the_buffer_instead_of_copying_the_cache():
    layer = GrowingLayer()
    layer.update(*_kv(2, 10, 0))
    start = layer.keys.data_ptr()
    for k in range(60):  # room for at least 64 more positions
        keys, _ = layer.update(*_kv(2, 1, k + 1))
        assert keys.data_ptr() == start
    layer.crop(-40)  # rewinding keeps the buffer; the next token overwrites position 30
    new = _kv(2, 1, 99)
    keys, values = layer.update(*new)
    assert keys.data_ptr() == start and keys.shape[2] == 31
    assert torch.equal(keys[:, :, 30:], new[0]) and torch.equal(values[:, :, 30:], new[1])


def test_with_autograd_recording_it_concatenates():
    layer = GrowingLayer()
    layer.update(*_kv(1, 5, 0))
    keys = torch.randn(1, 3, 1, 8, requires_grad=True)
    out, _ = layer.update(keys, torch.randn(1, 3, 1, 8))
    out.sum().backward()
    assert keys.grad is not None and torch.equal(keys.grad, torch.ones_like(keys))
