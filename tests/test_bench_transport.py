"""``dimat bench transport``: argument errors, and a tiny run that writes the documented JSON (no timing checks)."""

import json

import pytest

from dimat.cli import main as cli_main


def test_bad_arguments_exit_2(capsys, tmp_path):
    assert cli_main(["bench", "transport", "--sizes", "four"]) == 2
    assert "--sizes" in capsys.readouterr().err
    assert cli_main(["bench", "transport", "--sizes", "0"]) == 2
    assert cli_main(["bench", "transport", "--transports", "tcp,pigeon"]) == 2
    assert "pigeon" in capsys.readouterr().err
    assert cli_main(["bench", "transport", "--repeats", "0"]) == 2
    assert cli_main(["bench", "transport", "--model", "resnet9000"]) == 2
    assert "--model: unknown model 'resnet9000'" in capsys.readouterr().err
    assert cli_main(["bench", "transport", "--model", "mlp", "--classes", "0"]) == 2


def test_tiny_run_writes_json_with_every_field(tmp_path):
    out = tmp_path / "bench"
    assert cli_main(["bench", "transport", "--sizes", "0.5", "--transports", "grpc", "--repeats", "1",
                     "--out", str(out)]) == 0
    rows = json.loads((out / "transport.json").read_text())
    assert [r["transport"] for r in rows] == ["tcp", "grpc"]  # tcp always runs: every ratio needs it
    for r in rows:
        assert r["mib"] == 0.5 and r["gbps"] > 0 and r["peak_rss_mib"] > 0
        assert set(r) >= {"transport", "mib", "gbps", "ratio_to_tcp", "peak_rss_mib"}
    assert rows[0]["ratio_to_tcp"] == 1.0
    assert "| grpc | 0.5 |" in (out / "transport.md").read_text()
    assert "load average" in (out / "transport.md").read_text()  # ratios on busy cores: the load is part of it


def test_a_zoo_model_snapshot_moves_with_its_own_size(tmp_path):
    from dimat.bench.transport import model_snapshot

    out = tmp_path / "bench"
    assert cli_main(["bench", "transport", "--model", "cnn", "--width", "0.5", "--classes", "10",
                     "--transports", "torch", "--repeats", "1", "--out", str(out)]) == 0
    rows = json.loads((out / "transport.json").read_text())
    nbytes = sum(t.numel() * t.element_size() for t in model_snapshot("cnn", 0.5, 10).values())
    assert [r["transport"] for r in rows] == ["tcp", "torch"]
    for r in rows:
        assert r["model"] == "cnn" and abs(r["mib"] * (1 << 20) - nbytes) < 1e-6 and r["gbps"] > 0
    assert f"| torch | {nbytes / (1 << 20):.1f} (cnn) |" in (out / "transport.md").read_text()


def test_the_profile_sorts_samples_by_what_they_were_doing():
    from benchmarks.transport_profile import _category

    assert _category(["29c51a [unknown] (/usr/lib/x86_64-linux-gnu/libcrypto.so.3)"]) == "SHA-256 (OpenSSL)"
    assert _category(["1f2 x (/venv/site-packages/blake3/blake3.cpython-311-x86_64-linux-gnu.so)"]).startswith(
        "payload hash")
    assert _category(["ffff _copy_to_iter ([kernel.kallsyms])"]) == "socket receive (kernel)"
    assert _category(["ffff clear_page_erms ([kernel.kallsyms])", "ffff exc_page_fault ([kernel.kallsyms])"]) \
        == "page faults (kernel)"
    assert _category(["8d __memmove_avx512_unaligned_erms (/usr/lib/x86_64-linux-gnu/libc.so.6)"]) \
        == "memory copies (libc)"
    assert _category([]) == "other"


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["grpc", "torch"])
def test_the_profile_script_runs_without_perf(transport):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.transport_profile", "--transport", transport,
                           "--mib", "0.5", "--repeats", "2", "--no-perf"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"{transport}, 0.5 MiB, 2 transfers: median" in proc.stdout
    assert "CPU-s per transfer (/proc): sender" in proc.stdout
