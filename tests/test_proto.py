"""The generated gRPC code is what proto/dimat.proto gives, and imports from inside the package."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ("dimat_pb2.py", "dimat_pb2.pyi", "dimat_pb2_grpc.py")


def test_regenerating_from_proto_gives_the_committed_files(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools is in the test extra")
    # The exact command documented at the top of proto/dimat.proto, writing into a scratch tree.
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-Idimat/transport/_proto=proto",
           f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
           "proto/dimat.proto"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in GENERATED:
        fresh = (tmp_path / "dimat/transport/_proto" / name).read_bytes()
        committed = (ROOT / "dimat/transport/_proto" / name).read_bytes()
        assert fresh == committed, f"dimat/transport/_proto/{name} is stale: regenerate it (see proto/dimat.proto)"


def test_generated_code_imports_by_package_path():
    pb2_grpc = importlib.import_module("dimat.transport._proto.dimat_pb2_grpc")
    pb2 = importlib.import_module("dimat.transport._proto.dimat_pb2")
    assert pb2_grpc.dimat_dot_transport_dot___proto_dot_dimat__pb2 is pb2  # imported by package path
    service = pb2.DESCRIPTOR.services_by_name["Peer"]
    assert [m.name for m in service.methods] == ["SendSnapshot", "Status", "FetchState"]
    assert service.methods_by_name["SendSnapshot"].client_streaming
    assert service.methods_by_name["FetchState"].server_streaming  # state transfer: the frames of a snapshot
    assert hasattr(pb2_grpc, "PeerStub") and hasattr(pb2_grpc, "add_PeerServicer_to_server")


def test_frame_is_a_header_a_raw_chunk_or_a_trailer():
    from dimat.transport._proto import dimat_pb2 as pb

    oneof = pb.Frame.DESCRIPTOR.oneofs_by_name["kind"]
    assert [f.name for f in oneof.fields] == ["header", "chunk", "trailer"]
    # The digest follows the payload (the sender hashes as it sends); field 6 of the header is retired.
    assert "payload_sha256" not in pb.SnapshotHeader.DESCRIPTOR.fields_by_name
    assert "payload_digest" in pb.SnapshotTrailer.DESCRIPTOR.fields_by_name
    assert pb.SnapshotTrailer.DESCRIPTOR.fields_by_name["payload_digest"].number == 1  # was payload_sha256
    fields = pb.SnapshotHeader.DESCRIPTOR.fields_by_name
    # Numbers are the wire format: a new field never reuses one (payload_hash 9, the message lane 10).
    assert fields["payload_hash"].number == 9 and fields["lane"].number == 10
    assert "receiver" in pb.SnapshotHeader.DESCRIPTOR.fields_by_name
    assert pb.Frame.DESCRIPTOR.fields_by_name["chunk"].type == pb.Frame.DESCRIPTOR.fields_by_name["chunk"].TYPE_BYTES
