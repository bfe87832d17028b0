"""``dimat bench transport``: snapshot throughput of gRPC and gloo against raw TCP, over loopback.

For each snapshot size (MiB of float32 tensors, or one zoo model's state_dict with ``--model``) and each
transport, two fresh processes are started: a sender
and a receiver. The sender moves the snapshot ``--repeats`` times after one warm-up; a repeat's time runs from
the sender's ``post`` to the receiver holding the validated snapshot (``collect`` returned), on the machine's
monotonic clock, which both processes share. The median repeat is reported as Gbit/s and as a ratio to raw TCP
(``socket.sendall`` of one preallocated buffer into ``recv_into`` a preallocated buffer) measured in the same run,
with each process's peak resident memory (VmHWM: everything the process ever held, torch itself included) and
the CPU seconds each process spent per transfer (all threads; less disturbed by busy shared cores than wall time).

Printed as a Markdown table; with ``--out DIR`` also written to ``DIR/transport.json`` (a list of
``{transport, mib, model, gbps, ratio_to_tcp, peak_rss_mib, seconds, cpu_s_sender, cpu_s_receiver,
peak_rss_mib_sender, peak_rss_mib_receiver}``) and ``DIR/transport.md``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

HELP = "gRPC and gloo snapshot throughput vs raw TCP over loopback, with peak memory per process"

TRANSPORTS = ("tcp", "grpc", "torch")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=None, help="folder for transport.json and transport.md")
    parser.add_argument("--sizes", default="4,64,400", help="snapshot sizes in MiB, comma separated")
    parser.add_argument("--transports", default=",".join(TRANSPORTS), help="subset of tcp,grpc,torch")
    parser.add_argument("--repeats", type=int, default=3, help="timed transfers per case (median reported)")
    parser.add_argument("--compress", choices=["fp16", "bf16"], default=None, help="gRPC wire compression")
    parser.add_argument("--chunk-mib", type=float, default=1.0, help="gRPC chunk size in MiB")
    parser.add_argument("--model", default=None,
                        help="move a zoo model's state_dict instead of --sizes (mlp, cnn, vgg16, resnet20, resnet50, "
                             "or package.module:factory)")
    parser.add_argument("--width", type=float, default=1.0, help="the --model's width multiplier")
    parser.add_argument("--classes", type=int, default=100, help="the --model's number of classes")


# ------------------------------------------------------------------------------------------------ helpers
def peak_rss_mib() -> float:
    """This process's peak resident set size (VmHWM) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_snapshot(mib: float, piece_mib: float = 32.0) -> Dict[str, "object"]:
    """A float32 state_dict of ``mib`` MiB in tensors of at most ``piece_mib`` MiB (like a large model's layers)."""
    import torch

    total = int(mib * (1 << 20)) // 4
    per = int(piece_mib * (1 << 20)) // 4
    g = torch.Generator().manual_seed(0)
    snap, i = {}, 0
    while total > 0:
        n = min(per, total)
        snap[f"layer{i}.weight"] = torch.randn(n, generator=g)
        total -= n
        i += 1
    return snap


#: What a benchmark moves: MiB of synthetic float32 tensors, or a zoo model ``(name, width, num_classes)``.
Spec = Union[float, Tuple[str, float, int]]


def model_snapshot(name: str, width: float = 1.0, num_classes: int = 100) -> Dict[str, "object"]:
    """The state_dict of a freshly built zoo model (32x32 RGB inputs), seeded so both processes build the same."""
    import torch

    from dimat.models import build

    torch.manual_seed(0)
    return build(name, num_classes, width, 3, 32).state_dict()


def snapshot_of(spec: Spec) -> Dict[str, "object"]:
    return model_snapshot(*spec) if isinstance(spec, tuple) else make_snapshot(spec)


@functools.lru_cache(maxsize=None)
def spec_mib(spec: Spec) -> float:
    """The payload size of ``spec`` in MiB (a model's: the bytes of its state_dict's tensors; built once per spec,
    not once per transport measured)."""
    if not isinstance(spec, tuple):
        return float(spec)
    return sum(t.numel() * t.element_size() for t in snapshot_of(spec).values()) / (1 << 20)


# ------------------------------------------------------------------------------------------------- roles
# Each role runs in its own spawned process and puts one dict on the queue: {"times": [...], "rss": MiB} or
# {"error": text}. "times" are monotonic stamps: the sender's start of each repeat, the receiver's end.

def _tcp_receiver(q, mib: float, rounds: int) -> None:
    import numpy as np

    nbytes = int(mib * (1 << 20))
    buf = np.empty(nbytes, dtype=np.uint8)
    view = memoryview(buf)
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        q.put({"address": srv.getsockname()[1]})
        conn, _ = srv.accept()
        ends, cpus = [], []
        with conn:
            for _ in range(rounds):
                got = 0
                while got < nbytes:
                    n = conn.recv_into(view[got:], nbytes - got)
                    if n == 0:
                        raise ConnectionError("sender closed early")
                    got += n
                ends.append(time.monotonic())
                cpus.append(time.process_time())
                conn.sendall(b"k")
    q.put({"times": ends, "cpu": cpus, "rss": peak_rss_mib()})


def _tcp_sender(q, mib: float, rounds: int, port: int) -> None:
    import numpy as np

    buf = np.ones(int(mib * (1 << 20)), dtype=np.uint8)
    starts, cpus = [], []
    with socket.create_connection(("127.0.0.1", port)) as s:
        for _ in range(rounds):
            starts.append(time.monotonic())
            cpus.append(time.process_time())
            s.sendall(memoryview(buf))
            if s.recv(1) != b"k":
                raise ConnectionError("no acknowledgement")
    q.put({"times": starts, "cpu": cpus, "cpu_end": time.process_time(), "rss": peak_rss_mib()})


def _grpc_receiver(q, spec: Spec, rounds: int, opts: dict, acks) -> None:
    from dimat.transport.grpc_transport import GrpcTransport

    template = snapshot_of(spec)  # the receiver's own model, as in a real agent
    t = GrpcTransport(1, [0], {}, send_to=[], listen="127.0.0.1:0", template=template, deadline_s=600, **opts)
    try:
        q.put({"address": t.address})
        ends, cpus = [], []
        for r in range(rounds):
            got = t.collect(r)
            ends.append(time.monotonic())
            cpus.append(time.process_time())
            if 0 not in got:
                raise RuntimeError(f"round {r} did not arrive: {list(t.rejected)}")
            del got
            acks.put(r)  # one snapshot in flight at a time, so that peak memory is that of one transfer
        q.put({"times": ends, "cpu": cpus, "rss": peak_rss_mib()})
    finally:
        t.close()


def _grpc_sender(q, spec: Spec, rounds: int, opts: dict, address: str, acks) -> None:
    from dimat.transport.grpc_transport import GrpcTransport

    snap = snapshot_of(spec)
    t = GrpcTransport(0, [], {1: address}, send_to=[1], listen="127.0.0.1:0", deadline_s=600, **opts)
    try:
        starts, cpus = [], []
        for r in range(rounds):
            starts.append(time.monotonic())
            cpus.append(time.process_time())
            t.post(r, snap)
            t.collect(r)  # returns once my round-r send finished
            if acks.get(timeout=600) != r:
                raise RuntimeError("receiver out of step")
        q.put({"times": starts, "cpu": cpus, "cpu_end": time.process_time(), "rss": peak_rss_mib()})
    finally:
        t.close()


def _torch_role(q, spec: Spec, rounds: int, rank: int, port: int) -> None:
    import torch.distributed as dist

    from dimat.transport.torch_transport import TorchTransport

    snap = snapshot_of(spec)
    t = TorchTransport(rank, [0] if rank == 1 else [], send_to=[1] if rank == 0 else [], world_size=2,
                       master_addr="127.0.0.1", master_port=port, backend="gloo", timeout_s=600)
    try:
        stamps, cpus = [], []
        for r in range(rounds):
            if rank == 1:
                t.post(r, snap)  # the receiver must post too (its buffer is not sent: no out-neighbours)
            dist.barrier()
            if rank == 0:
                stamps.append(time.monotonic())
                cpus.append(time.process_time())
                t.post(r, snap)
            got = t.collect(r)
            if rank == 1:
                stamps.append(time.monotonic())
                cpus.append(time.process_time())
                if 0 not in got:
                    raise RuntimeError(f"round {r} was refused: {t.rejected}")
            del got
        dist.barrier()  # the sender's CPU figure ends once the receiver's last collect is done
        q.put({"times": stamps, "cpu": cpus, "cpu_end": time.process_time(), "rss": peak_rss_mib()})
    finally:
        t.close()


def _run(target: Callable, args: tuple, q) -> None:
    try:
        target(q, *args)
    except BaseException as e:  # report, so that the parent does not wait for a result that never comes
        import traceback

        q.put({"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"})


# ---------------------------------------------------------------------------------------------- measuring
def measure(transport: str, mib: Spec, repeats: int = 3, compress: Optional[str] = None,
            chunk_mib: float = 1.0, timeout_s: float = 600.0) -> dict:
    """Move a ``mib`` MiB snapshot, or a zoo model's given as ``(name, width, num_classes)``, ``repeats`` (+1
    warm-up) times between two fresh processes (raw TCP moves the same number of bytes).

    Returns ``{transport, mib, model, gbps, seconds, peak_rss_mib, peak_rss_mib_sender, peak_rss_mib_receiver}``
    (``model`` is None for synthetic tensors).
    """
    import multiprocessing as mp

    spec, mib = mib, spec_mib(mib)

    ctx = mp.get_context("spawn")
    rounds = repeats + 1
    qs, qr = ctx.Queue(), ctx.Queue()
    procs = []

    def start(target, args, q):
        p = ctx.Process(target=_run, args=(target, args, q), daemon=True)
        p.start()
        procs.append(p)

    def get(q):
        msg = q.get(timeout=timeout_s)
        if "error" in msg:
            raise RuntimeError(f"{transport} {mib} MiB: {msg['error']}")
        return msg

    try:
        if transport == "tcp":
            start(_tcp_receiver, (mib, rounds), qr)
            start(_tcp_sender, (mib, rounds, get(qr)["address"]), qs)
        elif transport == "grpc":
            # With a shared secret, as a deployment runs (its HMACs cover the header and the trailer's digest: no
            # cost per byte beyond the SHA-256, which the transport takes with or without a key).
            opts = {"compress": compress, "chunk_bytes": int(chunk_mib * (1 << 20)), "secret": "bench"}
            acks = ctx.Queue()
            start(_grpc_receiver, (spec, rounds, opts, acks), qr)
            start(_grpc_sender, (spec, rounds, opts, get(qr)["address"], acks), qs)
        elif transport == "torch":
            port = free_port()
            start(_torch_role, (spec, rounds, 0, port), qs)
            start(_torch_role, (spec, rounds, 1, port), qr)
        else:
            raise ValueError(f"unknown transport {transport!r}; choose from {', '.join(TRANSPORTS)}")
        sent, recv = get(qs), get(qr)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    seconds = [e - s for s, e in zip(sent["times"][1:], recv["times"][1:])]
    med = statistics.median(seconds)
    nbytes = mib * (1 << 20)
    # CPU seconds per transfer, each process (all its threads): a figure that shared cores disturb less.
    cpu_sender = (sent["cpu_end"] - sent["cpu"][1]) / repeats
    cpu_receiver = (recv["cpu"][-1] - recv["cpu"][0]) / repeats
    return {"transport": transport, "mib": mib, "model": spec[0] if isinstance(spec, tuple) else None,
            "gbps": nbytes * 8 / med / 1e9, "seconds": med,
            "cpu_s_sender": cpu_sender, "cpu_s_receiver": cpu_receiver,
            "peak_rss_mib": max(sent["rss"], recv["rss"]), "peak_rss_mib_sender": sent["rss"],
            "peak_rss_mib_receiver": recv["rss"]}


def table(rows: List[dict]) -> str:
    lines = ["| transport | MiB | Gbit/s | ratio to TCP | s per snapshot | CPU s sender / receiver | "
             "peak RSS sender / receiver (MiB) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        size = f"{r['mib']:.1f} ({r['model']})" if r.get("model") else f"{r['mib']:g}"
        lines.append(f"| {r['transport']} | {size} | {r['gbps']:.2f} | {r['ratio_to_tcp']:.2f} | "
                     f"{r['seconds']:.3f} | {r['cpu_s_sender']:.3f} / {r['cpu_s_receiver']:.3f} | "
                     f"{r['peak_rss_mib_sender']:.0f} / {r['peak_rss_mib_receiver']:.0f} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    from dimat.errors import UserError

    try:
        sizes = [float(s) for s in str(args.sizes).split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--sizes: expected MiB numbers separated by commas, got {args.sizes!r}") from None
    names = [s.strip() for s in str(args.transports).split(",") if s.strip()]
    bad = [n for n in names if n not in TRANSPORTS]
    if bad or not names:
        raise UserError(f"--transports: unknown {bad or names}; choose from {', '.join(TRANSPORTS)}")
    if not sizes or any(s <= 0 for s in sizes):
        raise UserError(f"--sizes: sizes must be positive MiB, got {args.sizes!r}")
    if args.repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {args.repeats}")
    specs: List[Spec] = list(sizes)
    if args.model is not None:
        if not (args.width > 0 and args.classes >= 1):
            raise UserError(f"--width must be > 0 and --classes >= 1, got {args.width} and {args.classes}")
        specs = [(args.model, args.width, args.classes)]
        try:
            spec_mib(specs[0])  # builds it once here, so that a bad name fails before any process starts
        except UserError as e:
            raise UserError(f"--model: {e}") from None
    if "tcp" not in names:
        names = ["tcp"] + names  # every ratio needs the TCP figure of the same run
    rows = []
    load_before = os.getloadavg()
    for spec in specs:
        tcp = None
        for name in names:
            what = f"{spec[0]} x{spec[1]:g}" if isinstance(spec, tuple) else f"{spec:g} MiB"
            print(f"measuring {name} {what} ...", file=sys.stderr, flush=True)
            row = measure(name, spec, args.repeats, compress=args.compress, chunk_mib=args.chunk_mib)
            if name == "tcp":
                tcp = row["gbps"]
            row["ratio_to_tcp"] = row["gbps"] / tcp
            rows.append(row)
    md = table(rows)
    command = "dimat bench transport " + " ".join(sys.argv[3:]) if sys.argv[1:3] == ["bench", "transport"] else ""
    load_after = os.getloadavg()
    # The machine's load (1-minute average) around the run: ratios measured on busy shared cores are noisier.
    info = (f"{platform.platform()}, {os.cpu_count()} CPUs, python {platform.python_version()}; "
            f"median of {args.repeats} transfers after one warm-up; compress={args.compress}; "
            f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print(md)
    print(info)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "transport.json").write_text(json.dumps(rows, indent=2) + "\n")
        (args.out / "transport.md").write_text(f"`{command.strip()}`\n\n{info}\n\n{md}\n")
        print(f"wrote {args.out / 'transport.json'} and {args.out / 'transport.md'}")
    return 0
