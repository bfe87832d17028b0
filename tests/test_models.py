"""The model zoo: every model builds and runs at the input sizes we use; users can bring their own model."""

import json
import textwrap

import pytest
import torch
from torch import nn

from dimat import models
from dimat.cli import main as cli_main
from dimat.errors import UserError


@pytest.mark.parametrize("name", models.names())
@pytest.mark.parametrize("in_channels,image_size", [(3, 32), (1, 8)])
def test_every_zoo_model_gives_one_logit_per_class(name, in_channels, image_size):
    width = 0.25 if name in ("vgg16", "resnet50") else 0.5
    model = models.build(name, 7, width=width, in_channels=in_channels, image_size=image_size).eval()
    out = model(torch.randn(2, in_channels, image_size, image_size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_width_scales_the_hidden_units():
    narrow = sum(p.numel() for p in models.build("cnn", 10, width=0.5).parameters())
    wide = sum(p.numel() for p in models.build("cnn", 10, width=2).parameters())
    assert wide > 8 * narrow


def test_resnet20_has_the_cifar_layout():
    m = models.build("resnet20", 100, width=1)
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d) and mod.kernel_size == (3, 3)]
    assert len(convs) == 19  # stem + 9 blocks x 2; with the fc layer: 20 weighted layers
    assert [c.out_channels for c in convs[::6]] == [16, 16, 32, 64]


@pytest.mark.parametrize("name,width,match", [("resnet18", 1, "unknown model 'resnet18'"), ("cnn", 0, "width must be > 0")])
def test_bad_model_requests_are_user_errors(name, width, match):
    with pytest.raises(UserError, match=match):
        models.build(name, 10, width=width)


def test_cnn_refuses_images_smaller_than_its_pooling():
    with pytest.raises(UserError, match="at least 4x4"):
        models.build("cnn", 10, in_channels=1, image_size=2)


class Tiny(nn.Module):
    def __init__(self, num_classes, width=1, in_channels=3, image_size=32):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size**2, int(16 * width)), nn.ReLU())
        self.head = nn.Linear(int(16 * width), num_classes)

    def forward(self, x):
        return self.head(self.body(x))


def test_register_adds_a_model_by_name(monkeypatch):
    monkeypatch.setitem(models._ZOO, "tiny", Tiny)
    m = models.build("tiny", 4, width=2, in_channels=1, image_size=8)
    assert isinstance(m, Tiny) and m.head.in_features == 32
    with pytest.raises(TypeError):
        models.register("broken", 42)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(textwrap.dedent("""
        from torch import nn

        def small(num_classes, width=1, in_channels=3, image_size=32):
            return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size ** 2, 24), nn.ReLU(),
                                 nn.Linear(24, num_classes))

        def not_a_model(num_classes, **kw):
            return "nope"

        VALUE = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_nets"


def test_a_factory_importable_from_user_code(user_module):
    m = models.build(f"{user_module}:small", 5, in_channels=1, image_size=8)
    assert m(torch.randn(3, 1, 8, 8)).shape == (3, 5)


@pytest.mark.parametrize("spec,match", [
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
    ("my_nets:missing", "has no attribute 'missing'"),
    ("my_nets:VALUE", "is not callable"),
    ("my_nets:not_a_model", "not a torch.nn.Module"),
])
def test_bad_factories_are_user_errors(user_module, spec, match):
    with pytest.raises(UserError, match=match):
        models.build(spec, 5)


def test_dimat_run_merges_a_user_model(user_module, tmp_path):
    cfg = tmp_path / "own.yaml"
    cfg.write_text("agents: 2\nrounds: 2\nthreads: 1\nmodel:\n  name: my_nets:small\n")
    assert cli_main(["run", str(cfg), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["agents"] == 2 and summary["method"] == "dimat"
    # both agents learned (10 digit classes: chance is 0.1; 2 epochs at Adam 1e-3 reach about 0.3) and their
    # accuracies are real numbers
    assert all(a is not None and 0.2 < a <= 1.0 for a in summary["per_agent_acc"]), summary["per_agent_acc"]
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = [r["test_acc"] for r in recs if r["phase"] == "merge" and r["round"] == 0]
    assert max(first) < min(summary["per_agent_acc"])  # better than the merged random inits
    merges = [r for r in recs if r["phase"] == "merge"]
    assert [(r["round"], r["received"]) for r in merges] == [(0, [1]), (0, [0]), (1, [1]), (1, [0])]
    assert all(r["comm_bytes"] > 0 and r["test_loss"] is not None for r in merges)
    # the checkpoint holds the user model's tensors and loads back into it
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "agent-0.pt", weights_only=True)
    fresh = models.build(f"{user_module}:small", 10, in_channels=1, image_size=8)
    fresh.load_state_dict(ckpt["model"])
