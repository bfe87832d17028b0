from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TensorEntry(_message.Message):
    __slots__ = ("name", "dtype", "shape", "wire_dtype", "offset", "nbytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    wire_dtype: str
    offset: int
    nbytes: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., wire_dtype: _Optional[str] = ..., offset: _Optional[int] = ..., nbytes: _Optional[int] = ...) -> None: ...

class Auth(_message.Message):
    __slots__ = ("timestamp_ms", "nonce", "hmac")
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    HMAC_FIELD_NUMBER: _ClassVar[int]
    timestamp_ms: int
    nonce: bytes
    hmac: bytes
    def __init__(self, timestamp_ms: _Optional[int] = ..., nonce: _Optional[bytes] = ..., hmac: _Optional[bytes] = ...) -> None: ...

class SnapshotHeader(_message.Message):
    __slots__ = ("sender", "round", "fingerprint", "tensors", "payload_bytes", "auth", "receiver", "payload_hash", "lane")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_HASH_FIELD_NUMBER: _ClassVar[int]
    LANE_FIELD_NUMBER: _ClassVar[int]
    sender: int
    round: int
    fingerprint: bytes
    tensors: _containers.RepeatedCompositeFieldContainer[TensorEntry]
    payload_bytes: int
    auth: Auth
    receiver: int
    payload_hash: str
    lane: str
    def __init__(self, sender: _Optional[int] = ..., round: _Optional[int] = ..., fingerprint: _Optional[bytes] = ..., tensors: _Optional[_Iterable[_Union[TensorEntry, _Mapping]]] = ..., payload_bytes: _Optional[int] = ..., auth: _Optional[_Union[Auth, _Mapping]] = ..., receiver: _Optional[int] = ..., payload_hash: _Optional[str] = ..., lane: _Optional[str] = ...) -> None: ...

class SnapshotTrailer(_message.Message):
    __slots__ = ("payload_digest", "hmac")
    PAYLOAD_DIGEST_FIELD_NUMBER: _ClassVar[int]
    HMAC_FIELD_NUMBER: _ClassVar[int]
    payload_digest: bytes
    hmac: bytes
    def __init__(self, payload_digest: _Optional[bytes] = ..., hmac: _Optional[bytes] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("header", "chunk", "trailer")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    header: SnapshotHeader
    chunk: bytes
    trailer: SnapshotTrailer
    def __init__(self, header: _Optional[_Union[SnapshotHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ..., trailer: _Optional[_Union[SnapshotTrailer, _Mapping]] = ...) -> None: ...

class SendReply(_message.Message):
    __slots__ = ("accepted", "reason")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    def __init__(self, accepted: bool = ..., reason: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("sender", "auth", "receiver")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_FIELD_NUMBER: _ClassVar[int]
    sender: int
    auth: Auth
    receiver: int
    def __init__(self, sender: _Optional[int] = ..., auth: _Optional[_Union[Auth, _Mapping]] = ..., receiver: _Optional[int] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("rank", "latest_posted_round", "latest_collected_round", "fingerprint")
    RANK_FIELD_NUMBER: _ClassVar[int]
    LATEST_POSTED_ROUND_FIELD_NUMBER: _ClassVar[int]
    LATEST_COLLECTED_ROUND_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    rank: int
    latest_posted_round: int
    latest_collected_round: int
    fingerprint: bytes
    def __init__(self, rank: _Optional[int] = ..., latest_posted_round: _Optional[int] = ..., latest_collected_round: _Optional[int] = ..., fingerprint: _Optional[bytes] = ...) -> None: ...
