"""Where a snapshot transfer's CPU time goes: ``perf`` on the two processes of ``dimat bench transport``.

    python -m benchmarks.transport_profile --transport grpc --mib 400 --repeats 6
    python -m benchmarks.transport_profile --transport torch --mib 64 --repeats 30

Starts a sender and a receiver as the benchmark does (gRPC with a shared secret and the receiver's model as its
template; or two gloo ranks), moves the snapshot twice to warm up (connections, pooled buffers), then attaches
``perf record -g`` (Linux perf; root or kernel.perf_event_paranoid <= 1 for kernel samples) to both processes
for ``--repeats`` transfers only, so that start-up, imports and building the snapshot are not in the profile.
Prints the median transfer time, each process's CPU seconds per transfer (from /proc, all threads), and the
sampled CPU seconds per transfer by what the sample was doing (payload hash, kernel send/receive, memory copies,
the Python interpreter, gRPC's Cython layer, the finite check, ...), sorted by the sampled function and the
library it lies in. ``--no-perf`` gives the timing and the /proc CPU figures alone.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

WARMUP = 2


def _grpc_receiver(q, go, acks, mib: float, rounds: int, chunk_bytes: int) -> None:
    from dimat.bench.transport import snapshot_of
    from dimat.transport.grpc_transport import GrpcTransport

    t = GrpcTransport(1, [0], {}, send_to=[], listen="127.0.0.1:0", template=snapshot_of(mib), deadline_s=600,
                      secret="bench", chunk_bytes=chunk_bytes)
    q.put(t.address)
    ends = []
    for r in range(rounds):
        got = t.collect(r)
        ends.append(time.monotonic())
        if 0 not in got:
            raise RuntimeError(f"round {r} did not arrive: {list(t.rejected)}")
        del got
        acks.put(r)
    q.put(ends)
    t.close()


def _grpc_sender(q, go, acks, mib: float, rounds: int, address: str, chunk_bytes: int) -> None:
    from dimat.bench.transport import snapshot_of
    from dimat.transport.grpc_transport import GrpcTransport

    snap = snapshot_of(mib)
    t = GrpcTransport(0, [], {1: address}, send_to=[1], listen="127.0.0.1:0", deadline_s=600, secret="bench",
                      chunk_bytes=chunk_bytes)
    starts = []
    for r in range(rounds):
        if r == WARMUP:
            q.put("warm")
            go.get()
        starts.append(time.monotonic())
        t.post(r, snap)
        t.collect(r)
        if acks.get(timeout=600) != r:
            raise RuntimeError("receiver out of step")
    q.put(starts)
    t.close()


def _torch_role(q, go, rank: int, mib: float, rounds: int, port: int) -> None:
    import torch.distributed as dist

    from dimat.bench.transport import snapshot_of
    from dimat.transport.torch_transport import TorchTransport

    snap = snapshot_of(mib)
    t = TorchTransport(rank, [0] if rank == 1 else [], send_to=[1] if rank == 0 else [], world_size=2,
                       master_addr="127.0.0.1", master_port=port, backend="gloo", timeout_s=600)
    if rank == 1:
        q.put("ready")
    stamps = []
    for r in range(rounds):
        if r == WARMUP:
            if rank == 0:
                q.put("warm")
                go.get()
            dist.barrier()
        if rank == 1:
            t.post(r, snap)
        dist.barrier()
        if rank == 0:
            stamps.append(time.monotonic())
            t.post(r, snap)
        got = t.collect(r)
        if rank == 1:
            stamps.append(time.monotonic())
            if 0 not in got:
                raise RuntimeError(f"round {r} was refused: {t.rejected}")
        del got
    dist.barrier()
    q.put(stamps)
    t.close()


def _cpu_s(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime, all threads


def _category(frames: List[str]) -> str:
    """What a sample was doing, from its call chain (leaf first)."""
    leaf = frames[0] if frames else ""
    chain = " ".join(frames[:12])
    if "blake3" in leaf:
        return "payload hash (blake3)"
    if "libcrypto" in leaf:
        return "SHA-256 (OpenSSL)"
    if "clear_page" in leaf or "page_fault" in chain:
        return "page faults (kernel)"
    if "_copy_to_iter" in leaf or "tcp_recvmsg" in chain:
        return "socket receive (kernel)"
    if "_copy_from_iter" in leaf or "tcp_sendmsg" in chain:
        return "socket send (kernel)"
    if "memmove" in leaf or "memcpy" in leaf:
        return "memory copies (libc)"
    if "pairwise_sum" in leaf or "isfinite" in leaf:
        return "finite check (numpy)"
    if "kernel.kallsyms" in leaf:
        return "kernel, other (scheduling, wake-ups, softirq)"
    for lib, name in (("libpython", "Python interpreter"), ("cygrpc", "gRPC Cython and core"),
                      ("libtorch", "torch"), ("libc10", "torch"), ("libgloo", "gloo"), ("libc.so", "libc, other"),
                      ("multiarray", "numpy, other")):
        if lib in leaf:
            return name
    return "other"


def _breakdown(data: str, hz: int, pids: Dict[int, str], transfers: int) -> str:
    out = subprocess.run(["perf", "script", "-i", data, "-F", "pid,tid,comm,ip,sym,dso"], capture_output=True,
                         text=True, check=True).stdout
    per: Dict[int, collections.Counter] = {pid: collections.Counter() for pid in pids}
    for sample in out.split("\n\n"):
        lines = [ln.strip() for ln in sample.strip().split("\n") if ln.strip()]
        if not lines:
            continue
        try:
            pid = int(lines[0].split()[1].split("/")[0])
        except (IndexError, ValueError):
            continue
        if pid in per:
            per[pid][_category(lines[1:])] += 1
    rows = []
    for pid, role in pids.items():
        total = sum(per[pid].values())
        rows.append(f"{role} (pid {pid}): {total / hz / transfers:.3f} CPU-s per transfer sampled")
        for what, n in per[pid].most_common():
            if n / hz / transfers >= 0.0005:
                rows.append(f"  {n / hz / transfers:7.4f} s  {what}")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--transport", choices=["grpc", "torch"], default="grpc")
    p.add_argument("--mib", type=float, default=400.0, help="snapshot size in MiB of float32 tensors")
    p.add_argument("--repeats", type=int, default=6, help="transfers profiled (after two warm-up ones)")
    p.add_argument("--chunk-mib", type=float, default=1.0, help="gRPC chunk size in MiB")
    p.add_argument("--hz", type=int, default=1999, help="perf sampling frequency")
    p.add_argument("--no-perf", action="store_true", help="time and count CPU only")
    args = p.parse_args(argv)
    use_perf = not args.no_perf
    if use_perf and shutil.which("perf") is None:
        sys.exit("perf is not installed: install linux perf, or pass --no-perf")
    if args.repeats < 1 or args.mib <= 0:
        sys.exit("--repeats must be >= 1 and --mib > 0")

    ctx = mp.get_context("spawn")
    rounds = WARMUP + args.repeats
    qs, qr, go = ctx.Queue(), ctx.Queue(), ctx.Queue()
    if args.transport == "grpc":
        acks = ctx.Queue()
        chunk = int(args.chunk_mib * (1 << 20))
        recv = ctx.Process(target=_grpc_receiver, args=(qr, go, acks, args.mib, rounds, chunk), daemon=True)
        recv.start()
        send = ctx.Process(target=_grpc_sender, args=(qs, go, acks, args.mib, rounds, qr.get(timeout=600), chunk),
                           daemon=True)
        send.start()
    else:
        from dimat.bench.transport import free_port

        port = free_port()
        send = ctx.Process(target=_torch_role, args=(qs, go, 0, args.mib, rounds, port), daemon=True)
        recv = ctx.Process(target=_torch_role, args=(qr, go, 1, args.mib, rounds, port), daemon=True)
        send.start()
        recv.start()
        qr.get(timeout=600)
    perf = None
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "perf.data")
        try:
            if qs.get(timeout=600) != "warm":
                raise RuntimeError("sender did not warm up")
            if use_perf:
                perf = subprocess.Popen(["perf", "record", "-F", str(args.hz), "-g", "-o", data, "-p",
                                         f"{send.pid},{recv.pid}"], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
                time.sleep(1.0)  # perf attaches
            cpu0 = [_cpu_s(send.pid), _cpu_s(recv.pid)]
            go.put(1)
            starts, ends = qs.get(timeout=600), qr.get(timeout=600)
            cpu1 = [_cpu_s(send.pid), _cpu_s(recv.pid)]
        finally:
            if perf is not None:
                perf.send_signal(2)
                perf.wait(timeout=120)
            for proc in (send, recv):
                proc.join(timeout=30)
                if proc.is_alive():
                    proc.kill()
        seconds = [e - s for s, e in zip(starts[WARMUP:], ends[-args.repeats:])]
        med = statistics.median(seconds)
        print(f"{args.transport}, {args.mib:g} MiB, {args.repeats} transfers: median {med:.4f} s "
              f"({args.mib * 8 * (1 << 20) / med / 1e9:.2f} Gbit/s), range {min(seconds):.4f} - {max(seconds):.4f} s; "
              f"load average {os.getloadavg()[0]:.2f}")
        print(f"CPU-s per transfer (/proc): sender {(cpu1[0] - cpu0[0]) / args.repeats:.3f}, "
              f"receiver {(cpu1[1] - cpu0[1]) / args.repeats:.3f}")
        if use_perf:
            print(_breakdown(data, args.hz, {send.pid: "sender", recv.pid: "receiver"}, args.repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
