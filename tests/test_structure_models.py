"""Identity acceptance tests for dimat.merge.structure on models written the way users write them.

Each model is merged with a copy of itself whose hidden units the TEST permutes with its own code (written out
per model below, not dimat's ``apply_permutation``): ``activation_match`` must give the model back, plain
``average`` must not. Models dimat cannot align must report it (coverage below 100%, ``strict`` raises).
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dimat import merge
from dimat.merge import UnalignedError, matching
from dimat.merge.structure import check_invariance, derive


def _perm(n: int, g: torch.Generator) -> torch.Tensor:
    p = torch.randperm(n, generator=g)
    while n > 1 and bool((p == torch.arange(n)).all()):
        p = torch.randperm(n, generator=g)
    return p


def _rows(t: torch.Tensor, p: torch.Tensor, dim: int = 0) -> torch.Tensor:
    return t.detach().index_select(dim, p).clone()


def _heads_perm(heads: int, d: int, head_p: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """Index over heads*d entries: new head h takes old head head_p[h]; inside it, new dim i takes old dim
    inner[i] (inner of shape [d]) or inner[h, i] (shape [heads, d]: a different permutation in every head)."""
    inner = inner[None, :] if inner.dim() == 1 else inner
    return (head_p[:, None] * d + inner).reshape(-1)


def _per_head(heads: int, d: int, g) -> torch.Tensor:
    return torch.stack([_perm(d, g) for _ in range(heads)])


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


def _apply(model: nn.Module, moves) -> nn.Module:
    """A copy of ``model`` with ``moves``: (tensor name, axis, index vector) applied by index_select."""
    b = copy.deepcopy(model)
    sd = b.state_dict()
    for name, axis, idx in moves:
        sd[name] = _rows(sd[name], idx, axis)
    b.load_state_dict(sd)
    return b


def _block_perm(blocks: int, size: int, g) -> torch.Tensor:
    """A permutation of blocks*size units that moves whole blocks and, differently in each, the units inside."""
    return _heads_perm(blocks, size, _perm(blocks, g), _per_head(blocks, size, g))


# -------------------------------------------------------------------------------------- GroupNorm, depthwise
class GNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.g1 = nn.GroupNorm(2, 8)
        self.c2 = nn.Conv2d(8, 6, 3, padding=1)
        self.g2 = nn.GroupNorm(3, 6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        h = F.relu(self.g1(self.c1(x)))
        h = F.relu(self.g2(self.c2(h)))
        return self.fc(h.mean((2, 3)))


def test_groupnorm():
    torch.manual_seed(0)
    a = GNNet()
    with torch.no_grad():
        for gn in (a.g1, a.g2):
            gn.weight.uniform_(0.5, 1.5)
            gn.bias.normal_(0, 0.3)
    g = torch.Generator().manual_seed(3)
    p1, p2 = _block_perm(2, 4, g), _block_perm(3, 2, g)
    b = _apply(a, [("c1.weight", 0, p1), ("c1.bias", 0, p1), ("g1.weight", 0, p1), ("g1.bias", 0, p1),
                   ("c2.weight", 1, p1), ("c2.weight", 0, p2), ("c2.bias", 0, p2), ("g2.weight", 0, p2),
                   ("g2.bias", 0, p2), ("fc.weight", 1, p2)])
    _check_identity(a, b, torch.randn(24, 3, 8, 8))


class DWNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.b2 = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        h = F.relu(self.b1(self.c1(x)))
        h = F.relu(self.b2(self.dw(h)))
        return self.fc(F.relu(self.pw(h)).mean((2, 3)))


def test_depthwise_conv():
    torch.manual_seed(0)
    a = DWNet()
    _randomise_bn(a, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(4)
    p1, p2 = _perm(8, g), _perm(6, g)
    moves = [(f"{m}.{k}", 0, p1) for m in ("b1", "b2") for k in ("weight", "bias", "running_mean", "running_var")]
    moves += [("c1.weight", 0, p1), ("c1.bias", 0, p1), ("dw.weight", 0, p1), ("dw.bias", 0, p1),
              ("pw.weight", 1, p1), ("pw.weight", 0, p2), ("pw.bias", 0, p2), ("fc.weight", 1, p2)]
    _check_identity(a, _apply(a, moves), torch.randn(24, 3, 8, 8))


# --------------------------------------------------------------------------------------------- attention
class ViTBlockMHA(nn.Module):
    """A small ViT: patch conv, cls token, positional embedding, pre-norm blocks with nn.MultiheadAttention."""

    def __init__(self, dim=16, heads=4, depth=2, classes=5, image=8, patch=4):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        n = (image // patch) ** 2
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.pos = nn.Parameter(torch.randn(1, n + 1, dim) * 0.5)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            self.blocks.append(nn.ModuleDict(dict(
                ln1=nn.LayerNorm(dim), attn=nn.MultiheadAttention(dim, heads, batch_first=True),
                ln2=nn.LayerNorm(dim), fc1=nn.Linear(dim, 2 * dim), fc2=nn.Linear(2 * dim, dim))))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        h = self.patch(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], dim=1) + self.pos
        for blk in self.blocks:
            y = blk["ln1"](h)
            h = h + blk["attn"](y, y, y, need_weights=False)[0]
            h = h + blk["fc2"](F.gelu(blk["fc1"](blk["ln2"](h))))
        return self.head(self.norm(h)[:, 0])


def _jitter_ln(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.3)


def test_vit_with_multihead_attention_cls_token_and_positions():
    torch.manual_seed(0)
    a = ViTBlockMHA()
    _jitter_ln(a)
    g = torch.Generator().manual_seed(5)
    dim, heads, hd = 16, 4, 4
    s = _perm(dim, g)  # the residual stream
    moves = [("patch.weight", 0, s), ("patch.bias", 0, s), ("cls", 2, s), ("pos", 2, s), ("norm.weight", 0, s),
             ("norm.bias", 0, s), ("head.weight", 1, s)]
    for i in range(2):
        b = f"blocks.{i}"
        hp = _perm(heads, g)
        qk = _heads_perm(heads, hd, hp, _per_head(heads, hd, g))
        vo = _heads_perm(heads, hd, hp, _per_head(heads, hd, g))
        inner = torch.cat([qk, qk + dim, vo + 2 * dim])  # rows of the packed [q; k; v] projection
        mlp = _perm(2 * dim, g)
        moves += [(f"{b}.ln1.weight", 0, s), (f"{b}.ln1.bias", 0, s), (f"{b}.ln2.weight", 0, s),
                  (f"{b}.ln2.bias", 0, s), (f"{b}.attn.in_proj_weight", 1, s),
                  (f"{b}.attn.in_proj_weight", 0, inner), (f"{b}.attn.in_proj_bias", 0, inner),
                  (f"{b}.attn.out_proj.weight", 1, vo), (f"{b}.attn.out_proj.weight", 0, s),
                  (f"{b}.attn.out_proj.bias", 0, s), (f"{b}.fc1.weight", 1, s), (f"{b}.fc1.weight", 0, mlp),
                  (f"{b}.fc1.bias", 0, mlp), (f"{b}.fc2.weight", 1, mlp), (f"{b}.fc2.weight", 0, s),
                  (f"{b}.fc2.bias", 0, s)]
    _check_identity(a, _apply(a, moves), torch.randn(24, 3, 8, 8))


class SDPAttention(nn.Module):
    """Hand-written attention: separate, fused or grouped-query q/k/v projections, a view into heads, SDPA."""

    def __init__(self, dim=16, heads=4, kv_heads=4, fused=False, manual=False):
        super().__init__()
        self.h, self.kvh, self.d = heads, kv_heads, dim // heads
        self.fused, self.manual = fused, manual
        if fused:
            self.qkv = nn.Linear(dim, 3 * dim)
        else:
            self.q = nn.Linear(dim, dim)
            self.k = nn.Linear(dim, kv_heads * self.d)
            self.v = nn.Linear(dim, kv_heads * self.d)
        self.o = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        if self.fused:
            q, k, v = self.qkv(x).view(B, T, 3, self.h, self.d).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q = self.q(x).view(B, T, self.h, self.d).transpose(1, 2)
            k = self.k(x).view(B, T, self.kvh, self.d).transpose(1, 2)
            v = self.v(x).view(B, T, self.kvh, self.d).transpose(1, 2)
        if self.manual:
            att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.d), dim=-1)
            y = att @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.kvh != self.h)
        return self.o(y.transpose(1, 2).reshape(B, T, C))


class TinyTransformer(nn.Module):
    def __init__(self, vocab=20, dim=16, classes=3, **attn):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.ln1 = nn.LayerNorm(dim)
        self.attn = SDPAttention(dim, **attn)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 32), nn.GELU(), nn.Linear(32, dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, ids, mask=None):
        h = self.emb(ids)
        h = h + self.attn(self.ln1(h))
        h = h + self.mlp(self.ln2(h))
        return self.head(h.mean(1))


def _permute_tiny(a: TinyTransformer, g, heads=4, kv_heads=4, fused=False) -> nn.Module:
    dim, d = 16, 4
    s, mlp = _perm(dim, g), _perm(32, g)
    moves = [("emb.weight", 1, s), ("head.weight", 1, s), ("mlp.0.weight", 1, s), ("mlp.0.weight", 0, mlp),
             ("mlp.0.bias", 0, mlp), ("mlp.2.weight", 1, mlp), ("mlp.2.weight", 0, s), ("mlp.2.bias", 0, s),
             ("attn.o.weight", 0, s), ("attn.o.bias", 0, s)]
    moves += [(f"ln{i}.{k}", 0, s) for i in (1, 2) for k in ("weight", "bias")]
    group = heads // kv_heads
    kvp = _perm(kv_heads, g)  # key/value heads; each carries its query heads along
    within = _perm(group, g)  # query heads inside a key/value group
    qheads = (kvp[:, None] * group + within[None, :]).reshape(-1)
    # one permutation per key/value head (Q/K share it, V/O share another); the query heads of a key/value
    # head share its permutation
    qk_kv, vo_kv = _per_head(kv_heads, d, g), _per_head(kv_heads, d, g)
    of_q = torch.arange(heads) // group  # new query head -> its new key/value head
    q_idx, o_idx = _heads_perm(heads, d, qheads, qk_kv[of_q]), _heads_perm(heads, d, qheads, vo_kv[of_q])
    k_idx, v_idx = _heads_perm(kv_heads, d, kvp, qk_kv), _heads_perm(kv_heads, d, kvp, vo_kv)
    moves += [("attn.o.weight", 1, o_idx)]
    if fused:
        rows = torch.cat([q_idx, k_idx + dim, v_idx + 2 * dim])
        moves += [("attn.qkv.weight", 1, s), ("attn.qkv.weight", 0, rows), ("attn.qkv.bias", 0, rows)]
    else:
        for name, idx in (("q", q_idx), ("k", k_idx), ("v", v_idx)):
            moves += [(f"attn.{name}.weight", 1, s), (f"attn.{name}.weight", 0, idx), (f"attn.{name}.bias", 0, idx)]
    return _apply(a, moves)


@pytest.mark.parametrize("kind", ["separate", "fused", "gqa", "mqa", "manual"])
def test_hand_written_attention(kind):
    torch.manual_seed(0)
    kw = dict(separate={}, fused=dict(fused=True), gqa=dict(kv_heads=2), mqa=dict(kv_heads=1),
              manual=dict(manual=True))[kind]
    a = TinyTransformer(**kw)
    _jitter_ln(a)
    b = _permute_tiny(a, torch.Generator().manual_seed(6), kv_heads=kw.get("kv_heads", 4), fused=kw.get("fused", False))
    _check_identity(a, b, torch.randint(0, 20, (24, 7)))


# ------------------------------------------------------------------------------------------------- LSTM
class LSTMClassifier(nn.Module):
    def __init__(self, vocab=20, emb=8, hidden=12, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.lstm = nn.LSTM(emb, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, ids):
        out, (h, c) = self.lstm(self.emb(ids))
        return self.fc(h[-1])


def test_lstm_classifier():
    torch.manual_seed(0)
    a = LSTMClassifier()
    g = torch.Generator().manual_seed(7)
    e, hp = _perm(8, g), _perm(12, g)
    gates = torch.cat([hp + 12 * i for i in range(4)])  # i, f, g, o blocks share one hidden permutation
    moves = [("emb.weight", 1, e), ("lstm.weight_ih_l0", 1, e), ("lstm.weight_ih_l0", 0, gates),
             ("lstm.weight_hh_l0", 0, gates), ("lstm.weight_hh_l0", 1, hp), ("lstm.bias_ih_l0", 0, gates),
             ("lstm.bias_hh_l0", 0, gates), ("fc.weight", 1, hp)]
    _check_identity(a, _apply(a, moves), torch.randint(0, 20, (24, 6)))


# --------------------------------------------------------------------------------------- Hugging Face models
transformers = pytest.importorskip("transformers")


class HFClassifier(nn.Module):
    """A Hugging Face model wrapped the way a user would: forward returns the logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).logits


def _hf_layer_moves(prefix: str, s, g, heads, d, inter, names):
    """Moves of one encoder layer: q/k/v/o and the MLP; names = (q, k, v, o, ln_attn, fc1, fc2, ln_out)."""
    q, k, v, o, ln_a, fc1, fc2, ln_o = (f"{prefix}.{n}" for n in names)
    hp = _perm(heads, g)
    qk, vo = _heads_perm(heads, d, hp, _per_head(heads, d, g)), _heads_perm(heads, d, hp, _per_head(heads, d, g))
    m = _perm(inter, g)
    moves = []
    for name, idx in ((q, qk), (k, qk), (v, vo)):
        moves += [(f"{name}.weight", 1, s), (f"{name}.weight", 0, idx), (f"{name}.bias", 0, idx)]
    moves += [(f"{o}.weight", 1, vo), (f"{o}.weight", 0, s), (f"{o}.bias", 0, s),
              (f"{fc1}.weight", 1, s), (f"{fc1}.weight", 0, m), (f"{fc1}.bias", 0, m),
              (f"{fc2}.weight", 1, m), (f"{fc2}.weight", 0, s), (f"{fc2}.bias", 0, s)]
    moves += [(f"{ln}.{p}", 0, s) for ln in (ln_a, ln_o) for p in ("weight", "bias")]
    return moves


def test_huggingface_bert_for_sequence_classification():
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=24, max_position_embeddings=16, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    a = HFClassifier(transformers.BertForSequenceClassification(cfg))
    _jitter_ln(a)
    g = torch.Generator().manual_seed(8)
    s, pool = _perm(16, g), _perm(16, g)
    e = "model.bert.embeddings"
    moves = [(f"{e}.word_embeddings.weight", 1, s), (f"{e}.position_embeddings.weight", 1, s),
             (f"{e}.token_type_embeddings.weight", 1, s), (f"{e}.LayerNorm.weight", 0, s),
             (f"{e}.LayerNorm.bias", 0, s), ("model.bert.pooler.dense.weight", 1, s),
             ("model.bert.pooler.dense.weight", 0, pool), ("model.bert.pooler.dense.bias", 0, pool),
             ("model.classifier.weight", 1, pool)]
    names = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm")
    for i in range(2):
        moves += _hf_layer_moves(f"model.bert.encoder.layer.{i}", s, g, 4, 4, 24, names)
    _check_identity(a, _apply(a, moves), torch.randint(0, 30, (24, 9)))


def test_huggingface_vit_for_image_classification():
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=24, num_labels=5)
    torch.manual_seed(0)
    a = HFClassifier(transformers.ViTForImageClassification(cfg))
    _jitter_ln(a)
    with torch.no_grad():
        a.model.vit.embeddings.cls_token.normal_()
        a.model.vit.embeddings.position_embeddings.normal_()
    g = torch.Generator().manual_seed(9)
    s = _perm(16, g)
    e = "model.vit.embeddings"
    moves = [(f"{e}.cls_token", 2, s), (f"{e}.position_embeddings", 2, s),
             (f"{e}.patch_embeddings.projection.weight", 0, s), (f"{e}.patch_embeddings.projection.bias", 0, s),
             ("model.vit.layernorm.weight", 0, s), ("model.vit.layernorm.bias", 0, s),
             ("model.classifier.weight", 1, s)]
    names = ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "layernorm_before",
             "mlp.fc1", "mlp.fc2", "layernorm_after")
    for i in range(2):
        moves += _hf_layer_moves(f"model.vit.layers.{i}", s, g, 4, 4, 24, names)
    _check_identity(a, _apply(a, moves), torch.randn(24, 3, 8, 8))


# ------------------------------------------------------------------------------------ what cannot be aligned
class SortNet(nn.Module):
    """Sorting the hidden units by value: their order carries meaning, so no permutation of them is allowed."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 10)
        self.fc2 = nn.Linear(10, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.fc1(x)).sort(dim=1).values
        return self.out(torch.relu(self.fc2(h)))


def test_unalignable_units_are_reported_and_strict_raises():
    torch.manual_seed(0)
    a, b = SortNet(), SortNet()
    x = torch.randn(32, 6)
    with pytest.warns(UserWarning, match="sort"):
        spec, _ = merge.spec_for(a, x)
    cov = spec.coverage()
    assert cov.fraction < 1.0 and [n for n, _ in cov.frozen] == ["fc1"]
    assert "sort is not understood" in cov.frozen[0][1] and "fc1" in spec.describe()
    with pytest.raises(UnalignedError, match="fc1: aten op sort is not understood"):
        merge.activation_match([a, b], [0.5, 0.5], [x], strict=True)
    merged = merge.activation_match([a, b], [0.5, 0.5], [x])  # not strict: fc1 averaged, fc2 still aligned
    assert torch.isfinite(_out(merged, x)).all()


class RotaryAttention(nn.Module):
    """Attention with rotary position embeddings: dims i and i + d/2 rotate together with position-dependent
    angles, so the within-head order of q and k is fixed; heads and V/O dims may still move."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.h, self.d = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.o = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 2)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.h, self.d).transpose(1, 2) for t in (q, k, v))
        pos = torch.arange(T, dtype=x.dtype)[:, None]
        freq = 1.0 / 100 ** (torch.arange(self.d // 2, dtype=x.dtype) / (self.d // 2))
        ang = torch.cat([pos * freq, pos * freq], dim=-1)

        def rot(t):
            t1, t2 = t.chunk(2, dim=-1)
            return t * ang.cos() + torch.cat([-t2, t1], dim=-1) * ang.sin()

        y = F.scaled_dot_product_attention(rot(q), rot(k), v)
        return self.head(self.o(y.transpose(1, 2).reshape(B, T, C)).mean(1))


def test_rotary_attention_keeps_within_head_order_but_moves_heads():
    torch.manual_seed(0)
    model, x = RotaryAttention(), torch.randn(2, 5, 16)
    spec = derive(model, x)
    q = next(g for g in spec.groups for a in g.axes if a.tensor == "qkv.weight" and a.axis == 0 and a.offset == 0)
    assert q.permutable and q.structured
    assert q.factors[0].units == 4 and not q.factors[0].fixed  # the heads move
    assert all(f.fixed for f in q.factors[1:])  # the rotated dims do not
    assert max(check_invariance(model, spec, x).values()) < 1e-4


def hf_vit(num_classes: int, width: float = 1.0, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """A user factory (``model.name: test_structure_models:hf_vit``): a small Hugging Face ViT returning logits."""
    hidden = max(8, int(96 * width) // 4 * 4)
    cfg = transformers.ViTConfig(image_size=image_size, patch_size=4, num_channels=in_channels, hidden_size=hidden,
                                 num_hidden_layers=2, num_attention_heads=4, intermediate_size=2 * hidden,
                                 num_labels=num_classes)
    return HFClassifier(transformers.ViTForImageClassification(cfg))


TIN20 = os.environ.get("DIMAT_TIN20", str(Path(__file__).resolve().parents[2] / "shared/data/tin20-dev.npz"))


@pytest.mark.slow
def test_dimat_run_with_a_user_vit_factory(tmp_path, capsys):
    import json

    from dimat.cli import main

    if not os.path.exists(TIN20):
        pytest.skip(f"{TIN20} is absent")
    cfg = tmp_path / "vit.yaml"
    cfg.write_text(f"""agents: 2
threads: 2
rounds: 2
data:
  dataset: npz:{os.path.abspath(TIN20)}
model:
  name: test_structure_models:hf_vit
  width: 0.25
merge:
  method: dimat
  stat_batches: 2
train:
  epochs: 1
  batch_size: 100
""")
    assert main(["run", str(cfg), "--out", str(tmp_path / "run"), "-q"]) == 0
    assert "can align only" not in capsys.readouterr().err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["merge_coverage"]["fraction"] == 1.0 and summary["final_mean_acc"] > 0.05


@pytest.mark.parametrize("kind", ["separate", "gqa"])
def test_weight_matching_recovers_structured_permutations(kind):
    torch.manual_seed(0)
    kv = 2 if kind == "gqa" else 4
    a = TinyTransformer(kv_heads=kv)
    _jitter_ln(a)
    b = _permute_tiny(a, torch.Generator().manual_seed(11), kv_heads=kv)
    x = torch.randint(0, 20, (8, 7))
    merged = merge.weight_match([a, b], [0.5, 0.5], [x], reset_bn=False)
    assert _rel(_out(merged, x), _out(a, x)) < 1e-4


class TiedNet(nn.Module):
    """A layer called twice, and an output head tied to the input embedding (as language models do)."""

    def __init__(self, vocab=12, dim=10):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.ln = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.emb.weight  # tied: one tensor, two state-dict names

    def forward(self, ids):
        h = self.emb(ids)
        h = h + torch.tanh(self.mix(h))
        h = h + torch.tanh(self.mix(h))  # the same module again
        return self.out(self.ln(h)).mean(1)


def test_tied_parameters_and_a_module_called_twice():
    torch.manual_seed(0)
    a = TiedNet()
    _jitter_ln(a)
    s = _perm(10, torch.Generator().manual_seed(12))
    b = copy.deepcopy(a)
    with torch.no_grad():  # the test's own permutation of the tied tensor and of everything on the stream
        b.emb.weight.copy_(a.emb.weight[:, s])
        b.mix.weight.copy_(a.mix.weight[s][:, s])
        b.mix.bias.copy_(a.mix.bias[s])
        b.ln.weight.copy_(a.ln.weight[s])
        b.ln.bias.copy_(a.ln.bias[s])
    assert b.out.weight is b.emb.weight
    spec = derive(a, torch.randint(0, 12, (2, 5)))
    g = next(g for g in spec.groups for x in g.axes if x.tensor == "emb.weight" and x.axis == 1)
    assert {"out.weight", "emb.weight"} <= {x.tensor for x in g.axes}  # both names of the tied tensor move
    _check_identity(a, b, torch.randint(0, 12, (24, 5)))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_other_huggingface_architectures_derive_fully(arch):
    """GPT-2 (Conv1D layers: x @ W + b, a packed c_attn split into q, k, v, last-token pooling by index) and
    Llama (RMSNorm, rotary embeddings, GQA, gated MLP): every hidden unit in a permuted group, and a randomly
    permuted copy merges back."""
    from dimat.merge.structure import apply_permutation, random_perms

    torch.manual_seed(0)
    if arch == "gpt2":
        inner = transformers.GPT2ForSequenceClassification(transformers.GPT2Config(
            vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=4, num_labels=3, pad_token_id=0))
    else:
        inner = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
            vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_labels=3, pad_token_id=0, max_position_embeddings=32))
    a = HFClassifier(inner).eval()
    x = torch.randint(1, 40, (16, 8))
    spec, _ = merge.spec_for(a, x)
    assert spec.coverage().fraction == 1.0, spec.coverage()
    b = copy.deepcopy(a)
    b.load_state_dict(apply_permutation(a.state_dict(), spec, random_perms(spec, torch.Generator().manual_seed(1))))
    merged = merge.activation_match([a, b], [0.5, 0.5], [x], reset_bn=False, repair=False, strict=True)
    assert _rel(_out(merged, x), _out(a, x)) < 1e-4
    assert _rel(_out(merge.average([a, b], [0.5, 0.5]), x), _out(a, x)) > 1e-2
