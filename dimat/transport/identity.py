"""Per-agent credentials: an agent's identity bound to its rank.

A shared secret proves membership of the cluster, not identity: anyone holding it can sign a snapshot with any
``sender``. With per-agent credentials every *pair* of agents shares a key of its own, and agent ``k`` holds only
the keys of the pairs it belongs to. A snapshot from ``i`` to ``j`` is signed with the key of the pair
``(i, j)``, which the receiver looks up by the ``sender`` the header claims. So a process holding agent 3's
credentials can sign as 3 (to anyone), but it cannot make a header that agent 1 accepts as coming from 2: it does
not hold the key of the pair (1, 2). Holding the credentials of agent 1 lets one forge "2 to 1" only to agent 1
itself, which is agent 1 already.

Pair keys are derived from one cluster master key (``HMAC-SHA256(master, "dimat-pair-key|lo|hi")``) by whoever
provisions the cluster (:func:`write_credentials`, ``dimat launch``); an agent never sees the master key.

A credentials file is YAML (JSON is YAML too)::

    rank: 3                  # the agent these credentials belong to
    keys:                    # rank -> hex key of the pair (that rank, 3), quoted; at least 16 bytes each
      0: "9f2c...e1"
      1: "41d0...7a"
      2: "..."
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Union

from dimat.transport.wire import AuthError

#: Shortest pair key accepted, in bytes.
MIN_KEY_BYTES = 16

_HEX = re.compile(r"^[0-9a-fA-F]+$")


@dataclass(frozen=True)
class Credentials:
    """One agent's keys: the key of the pair (``rank``, ``j``) for every peer ``j`` it may talk to.

    Attributes
    ----------
    rank : the agent these credentials belong to.
    keys : peer rank -> key of the pair (bytes).
    source : where they came from (a file name, for messages).
    """

    rank: int
    keys: Mapping[int, bytes] = field(repr=False)
    source: str = "<memory>"

    def key_for(self, peer: int) -> bytes:
        """The key of the pair (``rank``, ``peer``); :class:`AuthError` when these credentials have none."""
        try:
            return self.keys[int(peer)]
        except KeyError:
            raise AuthError(f"no key for agent {peer} in the credentials of agent {self.rank} ({self.source})") \
                from None


def pair_key(master: bytes, a: int, b: int) -> bytes:
    """The key of the pair of ranks ``a`` and ``b`` (order does not matter), derived from the cluster master key."""
    lo, hi = sorted((int(a), int(b)))
    return hmac.new(master, f"dimat-pair-key|{lo}|{hi}".encode(), hashlib.sha256).digest()


def derive(master: bytes, rank: int, ranks: Iterable[int]) -> Credentials:
    """Agent ``rank``'s credentials for talking with ``ranks`` (itself excluded)."""
    if not master:
        raise ValueError("the master key must not be empty")
    return Credentials(int(rank), {int(j): pair_key(master, rank, j) for j in ranks if int(j) != int(rank)})


def write_credentials(folder: Union[str, Path], num_agents: int, master: Optional[bytes] = None) -> List[Path]:
    """Write ``agent-K.keys.yaml`` (mode 0600) for every rank K in ``range(num_agents)`` into ``folder``.

    Each file holds only that agent's pair keys. ``master``: the cluster master key (default: 32 random bytes,
    used here and not written anywhere). Returns the files written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    master = secrets.token_bytes(32) if master is None else master
    out = []
    for k in range(int(num_agents)):
        cred = derive(master, k, range(num_agents))
        path = folder / f"agent-{k}.keys.yaml"
        text = f"rank: {k}\nkeys:\n" + "".join(f'  {j}: "{key.hex()}"\n' for j, key in sorted(cred.keys.items()))
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        out.append(path)
    return out


def credentials_path(template: Union[str, Path], rank: int) -> Path:
    """``template`` with ``{rank}`` replaced by ``rank`` (one config line for every agent of a cluster)."""
    return Path(str(template).replace("{rank}", str(int(rank))))


def load_credentials(path: Union[str, Path], rank: Optional[int] = None) -> Credentials:
    """Read a credentials file (see the module docstring).

    Parameters
    ----------
    path : the file.
    rank : the rank of the agent loading it; the file's ``rank`` must equal it.

    Raises
    ------
    ValueError : one line naming the file and the field: unreadable file, not YAML, no ``rank``, no ``keys``,
        a key that is not hex or shorter than 16 bytes, a peer that is not a rank, a rank that is not ``rank``.
    """
    import yaml

    path = Path(path)

    def bad(what: str) -> ValueError:
        return ValueError(f"credentials file {path}: {what}")

    try:
        text = path.read_text()
    except OSError as e:
        raise bad(e.strerror or str(e)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise bad(f"not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise bad("expected a mapping with fields 'rank' and 'keys'")
    if "rank" not in data:
        raise bad("field 'rank' is missing")
    own = data["rank"]
    if isinstance(own, bool) or not isinstance(own, int) or own < 0:
        raise bad(f"field 'rank' must be a non-negative integer, got {own!r}")
    if rank is not None and own != int(rank):
        raise bad(f"field 'rank' is {own}, but this is agent {rank}")
    if "keys" not in data:
        raise bad("field 'keys' is missing")
    raw = data["keys"]
    if not isinstance(raw, dict) or not raw:
        raise bad("field 'keys' must map peer ranks to hex keys")
    keys: Dict[int, bytes] = {}
    for j, value in raw.items():
        if isinstance(j, bool) or not isinstance(j, int) or j < 0:
            raise bad(f"field 'keys': {j!r} is not a rank")
        if j == own:
            raise bad(f"field 'keys.{j}': an agent has no key with itself")
        # YAML reads unquoted digits as a number (and a leading 0 as octal): only a quoted string is exact.
        if not isinstance(value, str) or not _HEX.match(value) or len(value) % 2:
            raise bad(f"field 'keys.{j}': not a quoted hex string")
        key = bytes.fromhex(value)
        if len(key) < MIN_KEY_BYTES:
            raise bad(f"field 'keys.{j}': {len(key)} bytes, at least {MIN_KEY_BYTES} needed")
        keys[j] = key
    return Credentials(own, keys, str(path))


__all__ = ["Credentials", "MIN_KEY_BYTES", "pair_key", "derive", "write_credentials", "credentials_path",
           "load_credentials"]
