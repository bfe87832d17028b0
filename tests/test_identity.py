"""Per-agent credentials: pair keys, the files that hold them, and every bad file."""

import stat

import pytest

from dimat.transport import create, wire
from dimat.transport.identity import (Credentials, credentials_path, derive, load_credentials, pair_key,
                                      write_credentials)

MASTER = b"m" * 32


def test_pair_keys_are_shared_by_the_pair_only():
    assert pair_key(MASTER, 1, 2) == pair_key(MASTER, 2, 1)
    assert len({pair_key(MASTER, a, b) for a, b in [(0, 1), (0, 2), (1, 2)]}) == 3
    assert pair_key(MASTER, 1, 2) != pair_key(b"another master" * 3, 1, 2)
    three = derive(MASTER, 3, range(5))
    assert sorted(three.keys) == [0, 1, 2, 4]
    assert three.key_for(1) == derive(MASTER, 1, range(5)).key_for(3)
    with pytest.raises(wire.AuthError, match="no key for agent 7"):
        three.key_for(7)


def test_written_files_hold_one_agent_each_private_and_load_back(tmp_path):
    files = write_credentials(tmp_path / "keys", 3, master=MASTER)
    assert [f.name for f in files] == ["agent-0.keys.yaml", "agent-1.keys.yaml", "agent-2.keys.yaml"]
    for k, f in enumerate(files):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
        cred = load_credentials(f, k)
        assert cred.rank == k and cred.keys == derive(MASTER, k, range(3)).keys
        assert MASTER.hex() not in f.read_text()  # the master key is nowhere in an agent's file
    assert credentials_path(tmp_path / "keys/agent-{rank}.keys.yaml", 2) == files[2]
    fresh = write_credentials(tmp_path / "other", 2)  # random master
    assert load_credentials(fresh[0]).key_for(1) == load_credentials(fresh[1]).key_for(0)


KEY = "ab" * 16

BAD_FILES = {
    "not yaml": ("rank: [1\n", "not valid YAML"),
    "not a mapping": ("- 1\n- 2\n", "expected a mapping"),
    "no rank": (f"keys:\n  1: \"{KEY}\"\n", "field 'rank' is missing"),
    "rank not an int": (f"rank: one\nkeys:\n  1: \"{KEY}\"\n", "field 'rank' must be a non-negative integer"),
    "wrong rank": (f"rank: 2\nkeys:\n  1: \"{KEY}\"\n", "field 'rank' is 2, but this is agent 0"),
    "no keys": ("rank: 0\n", "field 'keys' is missing"),
    "keys not a mapping": ("rank: 0\nkeys: [1, 2]\n", "field 'keys' must map"),
    "peer not a rank": (f"rank: 0\nkeys:\n  x: \"{KEY}\"\n", "field 'keys': 'x' is not a rank"),
    "key with itself": (f"rank: 0\nkeys:\n  0: \"{KEY}\"\n", "field 'keys.0': an agent has no key with itself"),
    "not hex": ("rank: 0\nkeys:\n  1: \"zz\"\n", "field 'keys.1': not a quoted hex string"),
    "unquoted digits": ("rank: 0\nkeys:\n  1: 0123456701234567012345670123456701\n", "field 'keys.1': not a quoted"),
    "too short": ("rank: 0\nkeys:\n  1: \"abcd\"\n", "field 'keys.1': 2 bytes, at least 16"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_bad_credentials_file_is_one_line_naming_file_and_field(tmp_path, case):
    text, reason = BAD_FILES[case]
    path = tmp_path / "agent-0.keys.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as e:
        load_credentials(path, 0)
    msg = str(e.value)
    assert msg.startswith(f"credentials file {path}: ") and reason in msg and "\n" not in msg


def test_a_missing_credentials_file_is_named(tmp_path):
    with pytest.raises(ValueError, match=f"credentials file {tmp_path / 'nope.yaml'}: No such file"):
        load_credentials(tmp_path / "nope.yaml", 0)


class _Topo:
    num_agents = 2
    peers = {0: "127.0.0.1:0", 1: "127.0.0.1:0"}

    def neighbors(self, i):
        return [1 - i]


def test_config_credentials_file_with_a_rank_template_reaches_the_transport(tmp_path, monkeypatch):
    monkeypatch.setenv("DIMAT_SECRET", "ignored when credentials are given")
    write_credentials(tmp_path, 2, master=MASTER)
    template = str(tmp_path / "agent-{rank}.keys.yaml")
    t = create("grpc", 1, _Topo(), {"credentials_file": template, "deadline_s": 1.0})
    try:
        assert isinstance(t._credentials, Credentials) and t._credentials.rank == 1 and t._secret is None
    finally:
        t.close()
    with pytest.raises(ValueError, match="give one"):
        create("grpc", 1, _Topo(), {"credentials_file": template, "secret": "s"})
    # Agent 0's file where agent 1 looks for its own: refused, naming the file and the field.
    (tmp_path / "swapped").mkdir()
    (tmp_path / "swapped/agent-1.keys.yaml").write_text((tmp_path / "agent-0.keys.yaml").read_text())
    with pytest.raises(ValueError, match="agent-1.keys.yaml: field 'rank' is 0, but this is agent 1"):
        create("grpc", 1, _Topo(), {"credentials_file": str(tmp_path / "swapped/agent-{rank}.keys.yaml")})


def test_config_accepts_the_credentials_file_key(tmp_path):
    from dimat.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("transport:\n  name: grpc\n  credentials_file: keys/agent-{rank}.keys.yaml\n")
    assert load_config(path)["transport"]["credentials_file"] == "keys/agent-{rank}.keys.yaml"
