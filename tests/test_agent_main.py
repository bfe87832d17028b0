"""dimat.agent_main's rejoin pieces without processes: state transfer from a neighbour (real gRPC transports on
free 127.0.0.1 ports), skipping ahead to the neighbours' round, and --join on a machine with no run folder."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dimat.agent_main import _catch_up, claim_run_dir, join_from_neighbour
from dimat.config import Config, DEFAULTS
from dimat.errors import UserError
from dimat.node import with_basis_tag
from dimat.transport.grpc_transport import GrpcTransport

FAST = dict(secret="s3cret", deadline_s=2.0, connect_timeout_s=1.0, retry_initial_s=0.05, retry_max_s=0.2)


@pytest.fixture
def pair():
    """Agent 0 (serves its state) and a new agent 1, neighbours, on free ports."""
    a = GrpcTransport(0, [1], {1: "127.0.0.1:1"}, listen="127.0.0.1:0", serve_state=True, **FAST)
    b = GrpcTransport(1, [0], {0: a.address}, listen="127.0.0.1:0", **FAST)
    a.peers[1] = b.address
    yield a, b
    a.close()
    b.close()


def _agent(rank, model):
    return SimpleNamespace(rank=rank, model=model, node=SimpleNamespace(basis_tag=rank, transport=None))


def test_a_new_agent_takes_its_neighbours_model_round_and_basis_tag(pair):
    a, b = pair
    torch.manual_seed(0)
    theirs, mine = nn.Linear(5, 3), nn.Linear(5, 3)
    a.post(6, with_basis_tag(theirs.state_dict(), 0))
    logs = []
    agent = _agent(1, mine)
    assert join_from_neighbour(agent, b, [0], log=logs.append) == 7
    assert torch.equal(mine.weight, theirs.weight) and agent.node.basis_tag == 0
    assert "took the round-6 state of neighbour 0 (state transfer); joining at round 7" in logs[-1]


def test_no_neighbour_with_a_state_means_starting_from_scratch(pair):
    a, b = pair  # agent 0 has posted nothing yet
    model = nn.Linear(5, 3)
    before = model.weight.clone()
    logs = []
    assert join_from_neighbour(_agent(1, model), b, [0], log=logs.append) is None
    assert torch.equal(model.weight, before) and "starting from scratch" in logs[-1]
    assert join_from_neighbour(_agent(1, model), object(), [0]) is None  # a transport without state transfer


class _Hint:
    def __init__(self, r):
        self.r = r

    def round_hint(self):
        return self.r


@pytest.mark.parametrize("sync, staleness, hint, r, want", [
    (True, 1, 7, 3, 7),     # a neighbour has posted round 7: skip 3..6
    (True, 1, 4, 3, 3),     # one round behind: caught up by not waiting (the transport), not by skipping
    (True, 1, 3, 3, 3),     # in step
    (True, 1, -1, 0, 0),    # nothing known
    (True, 1, 40, 3, 9),    # never beyond the last round
    (False, 2, 5, 3, 3),    # asynchronous: a lag within the staleness bound is fine
    (False, 2, 6, 3, 6),
])
def test_catch_up_skips_to_the_round_a_neighbour_has_posted(sync, staleness, hint, r, want):
    cfg = Config.wrap(dict(DEFAULTS, rounds=10, transport=dict(DEFAULTS["transport"], sync=sync,
                                                                 staleness=staleness)))
    agent = SimpleNamespace(rank=2, node=SimpleNamespace(transport=_Hint(hint)))
    logs = []
    assert _catch_up(cfg, agent, r, logs.append) == want
    assert bool(logs) == (want != r)


def test_join_creates_the_run_folder_that_resume_requires(tmp_path):
    cfg = Config.wrap(dict(DEFAULTS))
    with pytest.raises(UserError, match="no run to resume"):
        claim_run_dir(cfg, tmp_path / "new", 2, resume=True)
    claim_run_dir(cfg, tmp_path / "new", 2, resume=True, join=True)
    assert (tmp_path / "new" / "config.yaml").exists() and (tmp_path / "new" / "metrics").is_dir()
