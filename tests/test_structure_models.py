"""Identity acceptance tests for dimat.merge.structure on models written the way users write them.

Each model is merged with a copy of itself whose hidden units the TEST permutes with its own code (written out
per model below, not dimat's ``apply_permutation``): ``activation_match`` must give the model back, plain
``average`` must not. Models dimat cannot align must report it (coverage below 100%, ``strict`` raises).
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dimat import merge
from dimat.merge import UnalignedError, matching
from dimat.merge.structure import derive


def _perm(n: int, g: torch.Generator) -> torch.Tensor:
    p = torch.randperm(n, generator=g)
    while n > 1 and bool((p == torch.arange(n)).all()):
        p = torch.randperm(n, generator=g)
    return p


def _rows(t: torch.Tensor, p: torch.Tensor, dim: int = 0) -> torch.Tensor:
    return t.detach().index_select(dim, p).clone()


def _heads_perm(heads: int, d: int, head_p: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """Index over heads*d entries: new head h takes old head head_p[h], new dim i takes old dim inner[i]."""
    return (head_p[:, None] * d + inner[None, :]).reshape(-1)


def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        y = model.eval()(x)
    return getattr(y, "logits", y[0] if isinstance(y, tuple) else y)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _check_identity(a: nn.Module, b: nn.Module, x: torch.Tensor, batches=None) -> None:
    """b is a permuted copy of a: same function; activation_match gives a back, average does not."""
    assert _rel(_out(b, x), _out(a, x)) < 1e-5, "the test's own permutation changed the function"
    batches = batches or [x]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # these models must derive fully, without warnings
        spec, _ = merge.spec_for(a, batches[0])
    assert spec.coverage().fraction == 1.0, spec.coverage()
    merged = merge.activation_match([a, b], [0.5, 0.5], batches, reset_bn=False, repair=False, strict=True)
    assert _rel(_out(merged, x), _out(a, x)) < 1e-4
    avg = merge.average([a, b], [0.5, 0.5])
    assert _rel(_out(avg, x), _out(a, x)) > 1e-2


@pytest.fixture(autouse=True)
def _no_tie_break(monkeypatch):
    monkeypatch.setattr(matching, "TIE_BREAK", 0.0)


# ------------------------------------------------------------------------------------------ a forward flag
class FlagCNN(nn.Module):
    """A VGG-style BatchNorm CNN whose forward takes a flag with a default and checks the input's shape."""

    def __init__(self, width: int = 8, classes: int = 5):
        super().__init__()
        self.c1 = nn.Conv2d(3, width, 3, padding=1)
        self.b1 = nn.BatchNorm2d(width)
        self.c2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.b2 = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width * 4 * 4, 16)
        self.head = nn.Linear(16, classes)

    def forward(self, x, return_acts=False):
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected N x 3 x H x W, got {tuple(x.shape)}")
        h1 = F.max_pool2d(F.relu(self.b1(self.c1(x))), 2)
        h2 = F.max_pool2d(F.relu(self.b2(self.c2(h1))), 2)
        z = F.relu(self.fc(h2.view(h2.size(0), -1)))
        out = self.head(z)
        return (out, [h1, h2, z]) if return_acts else out


def _randomise_bn(m: nn.Module, g: torch.Generator) -> None:
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.running_mean.normal_(0, 0.3, generator=g)
                mod.running_var.uniform_(0.5, 2.0, generator=g)
                mod.weight.uniform_(0.5, 1.5, generator=g)
                mod.bias.normal_(0, 0.2, generator=g)


def _permute_flag_cnn(a: FlagCNN, g) -> FlagCNN:
    b = copy.deepcopy(a)
    p1, p2, p3 = _perm(a.c1.out_channels, g), _perm(a.c2.out_channels, g), _perm(16, g)
    sd = b.state_dict()
    for k in ("c1.weight", "c1.bias", "b1.weight", "b1.bias", "b1.running_mean", "b1.running_var"):
        sd[k] = _rows(sd[k], p1)
    sd["c2.weight"] = _rows(sd["c2.weight"], p1, 1)
    for k in ("c2.weight", "c2.bias", "b2.weight", "b2.bias", "b2.running_mean", "b2.running_var"):
        sd[k] = _rows(sd[k], p2)
    blocks = (p2[:, None] * 16 + torch.arange(16)[None, :]).reshape(-1)  # channel c owns its 4 x 4 inputs
    sd["fc.weight"] = _rows(sd["fc.weight"], blocks, 1)
    sd["fc.weight"], sd["fc.bias"] = _rows(sd["fc.weight"], p3), _rows(sd["fc.bias"], p3)
    sd["head.weight"] = _rows(sd["head.weight"], p3, 1)
    b.load_state_dict(sd)
    return b


def test_forward_flag_and_shape_check():
    torch.manual_seed(0)
    a = FlagCNN()
    _randomise_bn(a, torch.Generator().manual_seed(1))
    b = _permute_flag_cnn(a, torch.Generator().manual_seed(2))
    _check_identity(a, b, torch.randn(16, 3, 16, 16))
