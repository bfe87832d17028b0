"""dimat.merge.head: finding the output layer of a classifier, and counting an agent's samples per class."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dimat import models
from dimat.merge.head import count_labels, output_layer


@pytest.mark.parametrize("name, x", [("mlp", torch.randn(4, 1, 8, 8)), ("cnn", torch.randn(4, 3, 32, 32)),
                                     ("resnet20", torch.randn(4, 3, 32, 32))])
def test_zoo_models_have_their_last_linear_as_output_layer(name, x):
    torch.manual_seed(0)
    m = models.build(name, num_classes=7, in_channels=x.shape[1], image_size=x.shape[-1], width=0.25)
    layer, why = output_layer(m, x)
    assert why == "" and layer.classes == 7
    last = [n for n, mod in m.named_modules() if isinstance(mod, nn.Linear)][-1]
    assert layer.name == last and layer.axes == {f"{last}.weight": 0, f"{last}.bias": 0}


def test_huggingface_classifiers_return_their_classifier_logits():
    transformers = pytest.importorskip("transformers")

    class Wrapped(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)  # a ModelOutput with .logits

    bert = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=16, num_labels=3))
    layer, _ = output_layer(Wrapped(bert), torch.randint(0, 30, (2, 5)))
    assert layer.name == "inner.classifier" and layer.classes == 3
    vit = transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=24, num_labels=5))
    layer, _ = output_layer(Wrapped(vit), torch.randn(2, 3, 8, 8))
    assert layer.name == "inner.classifier" and layer.axes == {"inner.classifier.weight": 0,
                                                               "inner.classifier.bias": 0}


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.relu(self.fc(x))) / 2.0  # a temperature after the last Linear


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(3, 4)
        self.out = nn.Linear(4, 3, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(x)


@pytest.mark.parametrize("model, x, reason", [
    (Scaled(), torch.randn(2, 4), "no nn.Linear layer returns the model's logits unchanged"),
    (Tied(), torch.randn(2, 4), "shares its weight with 'emb.weight'"),
    (nn.Sequential(nn.Linear(4, 3), nn.Unflatten(1, (3, 1))), torch.randn(2, 4), "[batch, classes] logits"),
    (nn.Conv2d(3, 2, 1), torch.randn(2, 3, 4, 4), "[batch, classes] logits"),
])
def test_models_without_a_plain_output_layer_say_why(model, x, reason):
    layer, why = output_layer(model, x)
    assert layer is None and reason in why


def test_the_search_leaves_train_mode_alone():
    m = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.Linear(5, 3)).train()
    layer, _ = output_layer(m, torch.randn(8, 4))
    assert layer.name == "2" and m.training and all(mod.training for mod in m.modules())


def test_count_labels():
    batches = [(torch.zeros(3, 2), torch.tensor([0, 2, 2])), (torch.zeros(2, 2), torch.tensor([1, 2]))]
    assert torch.equal(count_labels(batches, 4), torch.tensor([1.0, 1.0, 3.0, 0.0], dtype=torch.float64))
    assert torch.equal(count_labels(batches, 4, limit=1), torch.tensor([1.0, 0.0, 2.0, 0.0], dtype=torch.float64))
    assert count_labels(batches, 2) is None  # label 2 is not a class of a 2-class layer
    assert count_labels([(torch.zeros(2, 2), torch.tensor([0.5, 1.0]))], 2) is None  # not integer labels
    assert count_labels([torch.zeros(2, 2)], 2) is None  # no labels at all
