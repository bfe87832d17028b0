"""Update rules of the gradient-gossip baselines against hand computations on per-agent quadratics.

Agent i minimises f_i(x) = 0.5 * ||x - a_i||^2 (gradient x - a_i); the team optimum is the mean of the a_i.
Messages are exchanged synchronously by a tiny driver here (post everything, then combine), exactly the protocol
of :mod:`dimat.gossip`, so each rule is checked on its own.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dimat import baselines
from dimat.baselines import CDMSGD, CDSGD, DPSGD, PUSH_SUM_KEY, SGP, Local, RuleState, mix

A = np.array([[1.0, -2.0], [4.0, 0.0], [-2.0, 5.0]])  # a_i, one row per agent
X0 = np.array([[0.0, 0.0], [3.0, 1.0], [-1.0, 2.0]])
PI = np.array([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.25, 0.25, 0.5]])  # symmetric, doubly stochastic


def grad(x: np.ndarray) -> np.ndarray:
    return x - A


def states(pi: np.ndarray, directed_out=None) -> list:
    n = len(pi)
    out = []
    for i in range(n):
        w = {j: float(pi[i, j]) for j in range(n) if pi[i, j] > 0 or j == i}
        m = len(directed_out[i]) if directed_out is not None else len(w) - 1
        out.append(RuleState(rank=i, weights=w, out_degree=m))
    return out


def as_dicts(x: np.ndarray) -> list:
    return [{"w": torch.tensor(row, dtype=torch.float64)} for row in x]


def sync_step(rule, xs, ds, sts, in_nbrs, communicate=True, drop=()):
    """One synchronous step: every agent posts, then every agent combines what its in-neighbours posted."""
    if not communicate:
        return [rule.local(x, d, st) for x, d, st in zip(xs, ds, sts)]
    msgs = [rule.message(x, d, st) for x, d, st in zip(xs, ds, sts)]
    new = []
    for i, (x, d, st) in enumerate(zip(xs, ds, sts)):
        received = {j: msgs[j] for j in in_nbrs[i] if (j, i) not in drop}
        new.append(rule.combine(x, d, st, msgs[i], received))
    return new


def run_sgd(rule, x0, pi, lr, steps, in_nbrs=None, sts=None, comm_every=1):
    """``steps`` steps of ``rule`` with plain-SGD displacements d = -lr * grad; returns the (N, 2) models."""
    n = len(x0)
    in_nbrs = in_nbrs or [[j for j in range(n) if j != i and pi[i, j] > 0] for i in range(n)]
    sts = sts or states(pi)
    xs = as_dicts(x0)
    for t in range(steps):
        x = np.stack([s["w"].numpy() for s in xs])
        ds = as_dicts(-lr * grad(x))
        xs = sync_step(rule, xs, ds, sts, in_nbrs, communicate=(t + 1) % comm_every == 0)
    return np.stack([s["w"].numpy() for s in xs])


# --------------------------------------------------------------------------------------------------- CDSGD
def test_cdsgd_matches_hand_computation_for_three_steps():
    lr = 0.1
    x = X0.copy()
    for _ in range(3):
        x = PI @ x - lr * grad(x)  # combine the neighbours' models, step along the own gradient at the own x
    np.testing.assert_allclose(run_sgd(CDSGD(), X0, PI, lr, 3), x, rtol=0, atol=1e-12)


def test_cdsgd_reaches_the_consensus_optimum_of_per_agent_quadratics():
    lr = 0.01
    x = run_sgd(CDSGD(), X0, PI, lr, 3000)
    # Fixed point of x = PI x - lr (x - A):  (I - PI + lr I) x* = lr A, within O(lr) of the team optimum.
    fixed = np.linalg.solve(np.eye(3) - PI + lr * np.eye(3), lr * A)
    np.testing.assert_allclose(x, fixed, atol=1e-8)
    # Doubly stochastic PI: the agents' average follows plain gradient descent on the team loss, to mean(a_i) ...
    np.testing.assert_allclose(x.mean(0), A.mean(0), atol=1e-8)
    # ... and each agent is within lr / spectral gap (0.75) of it; without mixing each x_i would go to its a_i.
    assert np.abs(x - A.mean(0)).max() <= lr / 0.75 * np.abs(A - A.mean(0)).max()
    local = run_sgd(Local(), X0, PI, lr, 3000)
    np.testing.assert_allclose(local, A, atol=1e-6)


def test_cdsgd_renormalises_weights_over_the_messages_that_arrived():
    lr = 0.1
    got = run_sgd_dropping(CDSGD(), lr, drop={(2, 0)})  # agent 2's message never reaches agent 0
    w0 = np.array([0.5, 0.25]) / 0.75
    expect0 = w0[0] * X0[0] + w0[1] * X0[1] - lr * grad(X0)[0]
    np.testing.assert_allclose(got[0], expect0, atol=1e-12)
    np.testing.assert_allclose(got[1], (PI @ X0 - lr * grad(X0))[1], atol=1e-12)


def run_sgd_dropping(rule, lr, drop):
    in_nbrs = [[1, 2], [0, 2], [0, 1]]
    xs, ds = as_dicts(X0), as_dicts(-lr * grad(X0))
    out = sync_step(rule, xs, ds, states(PI), in_nbrs, drop=drop)
    return np.stack([s["w"].numpy() for s in out])


def test_comm_every_takes_local_steps_between_exchanges():
    lr = 0.1
    x = X0.copy()
    for t in range(4):
        x = (PI @ x if (t + 1) % 2 == 0 else x) - lr * grad(x)
    np.testing.assert_allclose(run_sgd(CDSGD(), X0, PI, lr, 4, comm_every=2), x, atol=1e-12)


# -------------------------------------------------------------------------------------------------- CDMSGD
def test_cdmsgd_uses_a_nesterov_buffer_whatever_the_configured_optimizer():
    lr, mu = 0.1, 0.5
    rule = CDMSGD(momentum=mu)
    params = [torch.nn.Parameter(torch.tensor(r, dtype=torch.float64)) for r in X0]
    opts = [rule.optimizer([p], "adam", lr) for p in params]  # "adam" is overridden by the method
    assert all(isinstance(o, torch.optim.SGD) and o.defaults["nesterov"] for o in opts)
    sts = states(PI)
    in_nbrs = [[1, 2], [0, 2], [0, 1]]
    x, buf = X0.copy(), np.zeros_like(X0)
    for _ in range(3):
        # hand computation: b <- mu b + g;  x <- PI x - lr (g + mu b)
        g = grad(x)
        buf = mu * buf + g
        x = PI @ x - lr * (g + mu * buf)
        # the rule, with displacements from its own optimizer
        xs, ds = [], []
        for p, o in zip(params, opts):
            before = p.detach().clone()
            p.grad = (p.detach() - torch.tensor(A[len(xs)]))
            o.step()
            ds.append({"w": p.detach() - before})
            xs.append({"w": before})
        new = sync_step(rule, xs, ds, sts, in_nbrs)
        with torch.no_grad():
            for p, s in zip(params, new):
                p.copy_(s["w"])
    np.testing.assert_allclose(np.stack([p.detach().numpy() for p in params]), x, atol=1e-12)


def test_cdmsgd_rejects_a_momentum_outside_0_1():
    for mu in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="momentum"):
            CDMSGD(mu)


# --------------------------------------------------------------------------------------------------- D-PSGD
def test_dpsgd_is_adapt_then_combine():
    lr = 0.1
    x = X0.copy()
    for _ in range(3):
        x = PI @ (x - lr * grad(x))  # every agent steps first, then mixes the stepped models
    np.testing.assert_allclose(run_sgd(DPSGD(), X0, PI, lr, 3), x, atol=1e-12)
    assert not np.allclose(run_sgd(CDSGD(), X0, PI, lr, 3), x)  # the order matters


# ------------------------------------------------------------------------------------------------------ SGP
# A directed graph: 0 -> 1, 1 -> 2, 2 -> 0, 0 -> 2 (strongly connected, not balanced).
OUT = {0: [1, 2], 1: [2], 2: [0]}
IN = [[2], [0], [0, 1]]


def push_matrix() -> np.ndarray:
    """Column-stochastic P: P[k, i] = 1 / (out_degree(i) + 1) for k in out(i) and k = i."""
    p = np.zeros((3, 3))
    for i, outs in OUT.items():
        for k in outs + [i]:
            p[k, i] = 1.0 / (len(outs) + 1)
    return p


def sgp_states():
    return [RuleState(rank=i, weights={i: 1.0, **{j: 1.0 for j in IN[i]}}, out_degree=len(OUT[i])) for i in range(3)]


def test_sgp_matches_hand_computation_for_three_steps():
    lr = 0.1
    p = push_matrix()
    u, w = X0.copy(), np.ones(3)
    for _ in range(3):
        z = u / w[:, None]
        u = p @ (u + -lr * grad(z))  # numerator step at the de-biased model, then push
        w = p @ w
    sts = sgp_states()
    got = run_sgd(SGP(), X0, None, lr, 3, in_nbrs=IN, sts=sts)
    np.testing.assert_allclose(got, u / w[:, None], atol=1e-12)
    np.testing.assert_allclose([s.ps_weight for s in sts], w, atol=1e-12)


def test_push_sum_debiasing_recovers_the_true_average_on_a_directed_graph():
    p = push_matrix()
    assert not np.allclose(p.sum(1), 1)  # not row-stochastic: plain gossip would be biased
    sts = sgp_states()
    xs = as_dicts(X0)
    zero = as_dicts(np.zeros_like(X0))
    for _ in range(60):
        xs = sync_step(SGP(), xs, zero, sts, IN)
    z = np.stack([s["w"].numpy() for s in xs])
    np.testing.assert_allclose(z, np.tile(X0.mean(0), (3, 1)), atol=1e-9)
    # The numerators alone converge to the Perron vector's weighting, not to the average.
    u = z * np.array([s.ps_weight for s in sts])[:, None]
    assert np.abs(u - X0.mean(0)).max() > 0.05


def test_sgp_debiases_over_a_lost_message():
    sts = sgp_states()
    xs = as_dicts(X0)
    zero = as_dicts(np.zeros_like(X0))
    xs = sync_step(SGP(), xs, zero, sts, IN, drop={(0, 1)})  # agent 1 never gets agent 0's share
    # Agent 1 holds only its own share: its de-biased model is its own x, not a biased half of it.
    np.testing.assert_allclose(xs[1]["w"].numpy(), X0[1], atol=1e-12)
    assert sts[1].ps_weight == pytest.approx(0.5)


def test_sgp_message_carries_the_push_sum_weight():
    st = RuleState(rank=0, weights={0: 1.0, 1: 1.0}, out_degree=3)
    msg = SGP().message({"w": torch.ones(2)}, {"w": torch.zeros(2)}, st)
    assert float(msg[PUSH_SUM_KEY]) == pytest.approx(0.25)
    torch.testing.assert_close(msg["w"], torch.full((2,), 0.25))


def test_sgp_rejects_a_message_without_push_sum_weight():
    st = RuleState(rank=0, weights={0: 1.0, 1: 1.0}, out_degree=1)
    x, d = {"w": torch.ones(2)}, {"w": torch.zeros(2)}
    own = SGP().message(x, d, st)
    with pytest.raises(ValueError, match="push-sum"):
        SGP().combine(x, d, st, own, {1: {"w": torch.ones(2)}})


# ---------------------------------------------------------------------------------------- shared behaviour
def test_mix_averages_float_buffers_and_keeps_integer_buffers_local():
    a = {"bn.running_mean": torch.tensor([0.0, 2.0]), "bn.num_batches_tracked": torch.tensor(7)}
    b = {"bn.running_mean": torch.tensor([4.0, 6.0]), "bn.num_batches_tracked": torch.tensor(100)}
    out = mix(0, {0: a, 1: b}, {0: 0.75, 1: 0.25})
    torch.testing.assert_close(out["bn.running_mean"], torch.tensor([1.0, 3.0]))
    assert int(out["bn.num_batches_tracked"]) == 7
    assert out["bn.running_mean"].dtype == torch.float32


def test_mix_rejects_a_message_from_a_rank_that_is_not_an_in_neighbour():
    with pytest.raises(ValueError, match="rank 5"):
        mix(0, {0: {"w": torch.ones(1)}, 5: {"w": torch.ones(1)}}, {0: 1.0, 1: 0.0})


def test_rules_never_write_into_received_messages():
    st = states(PI)[0]
    x, d = {"w": torch.ones(2)}, {"w": torch.full((2,), -0.5)}
    nb = {1: {"w": torch.full((2,), 3.0)}, 2: {"w": torch.full((2,), 5.0)}}
    for rule in (CDSGD(), DPSGD()):
        rule.combine(x, d, st, rule.message(x, d, st), nb)
        assert float(nb[1]["w"][0]) == 3.0 and float(nb[2]["w"][0]) == 5.0 and float(x["w"][0]) == 1.0


def test_registry_and_bad_names():
    assert set(baselines.RULES) == {"cdsgd", "cdmsgd", "dpsgd", "sgp"}
    assert isinstance(baselines.get("sgp"), SGP)
    assert baselines.get("cdmsgd", momentum=0.7).momentum == 0.7
    with pytest.raises(ValueError, match="choose one of cdmsgd, cdsgd, dpsgd, sgp"):
        baselines.get("cdsdg")


def test_rule_state_rejects_bad_input():
    with pytest.raises(ValueError, match="own rank 2"):
        RuleState(rank=2, weights={0: 0.5, 1: 0.5})
    with pytest.raises(ValueError, match="non-negative"):
        RuleState(rank=0, weights={0: 1.5, 1: -0.5})
    with pytest.raises(ValueError, match="out_degree"):
        RuleState(rank=0, weights={0: 1.0}, out_degree=-1)
