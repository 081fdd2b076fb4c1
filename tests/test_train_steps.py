"""A training step's batch in parts (`edgekit.model.train_steps`): the parts' gradients add up to the batch's."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from edgekit.model.train_steps import backward_in_parts, one_core_per_part, split


def test_split_gives_contiguous_near_equal_slices_and_no_empty_one():
    assert split(7, 3) == [slice(0, 3), slice(3, 5), slice(5, 7)]
    assert split(2, 4) == [slice(0, 1), slice(1, 2)]
    assert split(5, 1) == [slice(0, 5)]


def test_the_parts_gradients_add_up_to_the_whole_batchs_in_threads():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    unused = nn.Parameter(torch.zeros(2))
    x, y = torch.randn(7, 5), torch.randint(0, 3, (7,))
    F.cross_entropy(model(x), y).backward()
    whole = [p.grad.clone() for p in model.parameters()]

    def share(rows: slice):  # the part's summed loss over the whole batch's size: the shares add up to the mean
        return F.cross_entropy(model(x[rows]), y[rows], reduction="sum") / len(x), rows

    runs = []
    for _ in range(2):
        with one_core_per_part(3):
            loss, extras = backward_in_parts([partial(share, r) for r in split(7, 3)], [*model.parameters(), unused], 3)
        runs.append([p.grad.clone() for p in model.parameters()])
        assert extras == split(7, 3)  # in the parts' order, whichever thread finished first
        assert abs(loss.item() - F.cross_entropy(model(x), y).item()) < 1e-6
        assert unused.grad is None  # as `backward` leaves a parameter no part reaches
    assert all(torch.allclose(g, w, atol=1e-6) for g, w in zip(runs[0], whole))
    assert all(torch.equal(a, b) for a, b in zip(*runs))  # added in the parts' order: the same bits every time
