"""No network: caption, ask, point, a batch and the export of a local directory open no socket, and `serve` listens
only where it was asked (127.0.0.1 by default) and connects nowhere.

The commands run in a subprocess through a small wrapper that makes every way of opening a socket record the attempt
and raise before `molmocap.cli.entry()` starts; the test checks both the exit status and that nothing was recorded
(so an attempt that the code caught and ignored still fails the test). The server is checked from outside, in
/proc/net: every internet socket of its process must be bound to the address and port it was given.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import noise_image, serve_process

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo" / "onnx"
DEMO_CHECKPOINT = ROOT / "models" / "demo" / "checkpoint"

WRAPPER = """
import socket
import sys
import traceback

ATTEMPTS = sys.argv.pop(1)


def refuse(name):
    def refused(*args, **kwargs):
        with open(ATTEMPTS, "a") as log:
            log.write(f"socket.{name}{args[1:] if name == 'socket' else args}\\n")
            traceback.print_stack(file=log)
        raise OSError(f"network access attempted: socket.{name}")
    return refused


socket.socket.__init__ = refuse("socket")
for name in ("create_connection", "getaddrinfo", "gethostbyname", "socketpair", "fromfd", "create_server"):
    setattr(socket, name, refuse(name))

from molmocap.cli import entry

sys.argv[0] = "molmocap"
entry()
"""


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """Run `molmocap ARGS` with sockets refused; returns (completed process, recorded attempts)."""
    root = tmp_path_factory.mktemp("offline")
    wrapper = root / "offline_molmocap.py"
    wrapper.write_text(WRAPPER)

    def run(*args: str, cwd: Path = ROOT) -> tuple[subprocess.CompletedProcess, str]:
        attempts = root / f"attempts-{time.monotonic_ns()}.log"
        # No offline switch is set: the code itself must not reach out, whatever the environment allows.
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
        env["MOLMOCAP_CACHE_DIR"] = str(root / "cache")
        proc = subprocess.run([sys.executable, str(wrapper), str(attempts), *args], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=600)
        return proc, attempts.read_text() if attempts.exists() else ""

    return run


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    noise_image(60, 90, seed=1).save(root / "a.png")
    noise_image(80, 50, seed=2).save(root / "b.jpg")
    return root


def test_the_wrapper_catches_a_socket(offline, tmp_path):
    """The mechanism itself: a command that does open a socket is caught (here: the server binding its port)."""
    proc, attempts = offline("serve", "--model", str(DEMO), "--threads", "1", "--port", "0")
    assert proc.returncode != 0 and "socket." in attempts, (proc.returncode, proc.stderr[-500:])


MODEL = ("--model", str(DEMO), "--threads", "1", "--max-new-tokens", "3")


@pytest.mark.parametrize("args", [
    ("caption", "{photos}/a.png", *MODEL, "--no-cache"),
    ("caption", "{photos}/a.png", *MODEL, "--style", "tags", "--json"),
    ("ask", "{photos}/b.jpg", "What color is it?", *MODEL),
    ("point", "{photos}/a.png", "circle", *MODEL, "--json"),
], ids=["caption", "caption-with-cache", "ask", "point"])
def test_commands_open_no_socket(offline, photos, args):
    proc, attempts = offline(*(arg.format(photos=photos) for arg in args))
    assert proc.returncode == 0, proc.stderr
    assert attempts == ""
    assert proc.stdout.strip()


def test_a_batch_opens_no_socket(offline, photos, tmp_path):
    out = tmp_path / "out.jsonl"
    proc, attempts = offline("caption", str(photos), "-o", str(out), *MODEL, "--write-xmp")
    assert proc.returncode == 0, proc.stderr
    assert attempts == ""
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(row.get("text") for row in rows), rows


def test_export_of_a_local_directory_opens_no_socket(offline, tmp_path):
    out = tmp_path / "onnx"
    proc, attempts = offline("export", str(DEMO_CHECKPOINT), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert attempts == ""
    assert (out / "molmocap.json").is_file()


def inet_sockets(pid: int) -> list[tuple[str, str, int, str]]:
    """(table, local address, local port, state) of every TCP/UDP socket, IPv4 or IPv6, that process `pid` holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = []
    for table in ("tcp", "tcp6", "udp", "udp6"):
        lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        for line in lines:
            fields = line.split()
            if fields[9] in inodes:
                address, port = fields[1].split(":")
                found.append((table, decode_address(address), int(port, 16), fields[3]))
    return found


def decode_address(hex_address: str) -> str:
    """/proc/net's little-endian hex address as text (IPv4, or IPv6 in four little-endian words)."""
    raw = bytes.fromhex(hex_address)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    return socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))


@pytest.mark.parametrize("host", [None, "127.0.0.1"], ids=["default-host", "explicit-host"])
def test_the_server_listens_only_where_asked(host):
    import httpx

    with serve_process("--model", str(DEMO), "--threads", "1", *(["--host", host] if host else [])) as (proc, port):
        with httpx.Client(trust_env=False, timeout=60) as client:  # hold a connection open while looking
            client.get(f"http://127.0.0.1:{port}/health")
            sockets = inet_sockets(proc.pid)
    listening = [s for s in sockets if s[0].startswith("tcp") and s[3] == "0A"]
    assert listening == [("tcp", "127.0.0.1", port, "0A")], sockets
    assert all(s[1] == "127.0.0.1" and s[2] == port for s in sockets), sockets  # nothing outbound, no UDP
