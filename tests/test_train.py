"""Local training helpers: batching, optimizers, the training pass and evaluation."""

import itertools
import math

import pytest
import torch
from torch import nn

from dimat.train import evaluate, make_optimizer, optimizer_factory, shuffled_batches, train_epochs


def _data(n=25, features=3):
    x = torch.arange(n * features, dtype=torch.float32).view(n, features)
    return x, torch.arange(n)


def test_each_pass_visits_every_sample_once_in_a_new_order():
    x, y = _data()
    batches = list(shuffled_batches(x, y, 10, torch.Generator().manual_seed(0), passes=2))
    assert [len(b[1]) for b in batches] == [10, 10, 5, 10, 10, 5]
    first = torch.cat([b[1] for b in batches[:3]])
    second = torch.cat([b[1] for b in batches[3:]])
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(25))
    assert not torch.equal(first, second)
    for xb, yb in batches:
        assert torch.equal(xb, x[yb])  # inputs stay paired with their labels


def test_no_passes_is_endless_and_zero_passes_is_empty():
    x, y = _data()
    endless = shuffled_batches(x, y, 10, torch.Generator().manual_seed(0))
    assert len(list(itertools.islice(endless, 31))) == 31
    assert list(shuffled_batches(x, y, 10, torch.Generator(), passes=0)) == []


def test_the_generator_alone_decides_orders_and_flips():
    x = torch.randn(12, 1, 2, 4)
    y = torch.arange(12)

    def labels_and_inputs(seed):
        return [(xb, yb) for xb, yb in shuffled_batches(x, y, 5, torch.Generator().manual_seed(seed), flip=True,
                                                         passes=3)]

    a, b, c = labels_and_inputs(1), labels_and_inputs(1), labels_and_inputs(2)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    assert any(not torch.equal(p[1], q[1]) for p, q in zip(a, c))


def test_flip_mirrors_some_images_and_leaves_the_rest():
    x = torch.randn(64, 1, 2, 4)
    y = torch.arange(64)
    (xb, yb), = shuffled_batches(x, y, 64, torch.Generator().manual_seed(0), flip=True, passes=1)
    mirrored = torch.tensor([torch.equal(xb[i], x[yb[i]].flip(-1)) for i in range(64)])
    kept = torch.tensor([torch.equal(xb[i], x[yb[i]]) for i in range(64)])
    assert (mirrored | kept).all()
    assert 10 < int(mirrored.sum()) < 54
    assert torch.equal(x, x.clone())  # the source tensor is not written


def test_flip_ignores_flat_features():
    x, y = _data()
    for xb, yb in shuffled_batches(x, y, 7, torch.Generator().manual_seed(0), flip=True, passes=1):
        assert torch.equal(xb, x[yb])


@pytest.mark.parametrize("name, kind", [("sgd", torch.optim.SGD), ("msgd", torch.optim.SGD),
                                        ("adam", torch.optim.Adam)])
def test_optimizers(name, kind):
    opt = optimizer_factory(name, 0.1, weight_decay=0.01)(nn.Linear(2, 2))
    assert isinstance(opt, kind)
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["weight_decay"] == 0.01
    assert opt.param_groups[0].get("momentum", 0) == (0.9 if name == "msgd" else 0)


def test_unknown_optimizer_fails_when_the_factory_is_made():
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'"):
        optimizer_factory("lamb", 0.1)
    with pytest.raises(ValueError, match="sgd, msgd, adam"):
        make_optimizer("rmsprop", [torch.zeros(1, requires_grad=True)], 0.1)


def test_training_lowers_the_loss_and_evaluate_restores_the_mode():
    torch.manual_seed(0)
    x = torch.randn(200, 4)
    y = (x[:, 0] > 0).long()
    model = nn.Linear(4, 2)
    before = evaluate(model, x, y)
    first = train_epochs(model, make_optimizer("adam", model.parameters(), 0.05), x, y, 1, 20, torch.Generator())
    later = train_epochs(model, make_optimizer("adam", model.parameters(), 0.05), x, y, 5, 20, torch.Generator())
    acc, loss = evaluate(model, x, y)
    assert later < first and loss < before[1] and acc > 0.9
    model.train()
    evaluate(model, x, y)
    assert model.training


def test_empty_inputs():
    model = nn.Linear(3, 2)
    empty_x, empty_y = torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)
    assert all(math.isnan(v) for v in evaluate(model, empty_x, empty_y))
    assert math.isnan(train_epochs(model, make_optimizer("sgd", model.parameters(), 0.1), empty_x, empty_y, 2, 10,
                                   torch.Generator()))
