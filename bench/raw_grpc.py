#!/usr/bin/env python
"""The transport ceiling: plain grpcio on loopback, no fedray code.

    python bench/raw_grpc.py [--clients C] [--mb S] [--repeat R]

One server process and C client processes. In a round every client downloads S MB (10^6
bytes) from the server as a server stream of 1 MiB messages, then uploads the same bytes
back as a client stream of 1 MiB messages: the shape of one FedAvg round, with nothing but
gRPC on the path (raw bytes messages, no protobuf, no auth, no checks). Both ends are
``grpc.aio``, as fedray's combiners and edge clients are, with fedray's message-size
options (``MAX_MESSAGE_BYTES`` below mirrors ``fedray/bridge/server.py`` and
``fedray/edge/client.py``; tests/test_bench_tools.py checks that they agree).

The clients connect first; then the driver starts each round on all of them at once and
times it from the start signal to the last client's report. Exactly one JSON line goes to
stdout (the median over ``--repeat`` rounds); progress goes to stderr. Ctrl-C or SIGTERM
stops the child processes. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

CHUNK = 1024 * 1024  # bytes per streamed message, as fedray's downloads and uploads
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # grpc.max_receive_message_length, as fedray sets it
SERVER_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                  ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1),  # a connection per client
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
DOWNLOAD = "/rawbench.Bench/Download"
UPLOAD = "/rawbench.Bench/Upload"
CONNECT_TIMEOUT_S = 60.0


def log(msg: str) -> None:
    print(f"[raw_grpc] {msg}", file=sys.stderr, flush=True)


def cpu_seconds(pid: int | str = "self") -> float:
    """utime + stime of a process in seconds (0.0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- server


def serve_main(args: argparse.Namespace) -> int:
    """Serve Download (the model, in CHUNK slices) and Upload (counts what arrives)."""
    import grpc

    model = os.urandom(args.bytes)

    async def download(request: bytes, context: Any):
        for offset in range(0, len(model), CHUNK):
            yield model[offset : offset + CHUNK]

    async def upload(requests: Any, context: Any) -> bytes:
        total = 0
        async for chunk in requests:
            total += len(chunk)
        return total.to_bytes(8, "big")

    handler = grpc.method_handlers_generic_handler("rawbench.Bench", {
        "Download": grpc.unary_stream_rpc_method_handler(download),
        "Upload": grpc.stream_unary_rpc_method_handler(upload),
    })  # no (de)serializers: the messages are the raw bytes

    async def run() -> None:
        server = grpc.aio.server(options=SERVER_OPTIONS)
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(json.dumps({"port": port}), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver's to handle; it sends SIGTERM
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.create_task(orphan_guard(stop))
        await stop.wait()
        await server.stop(grace=0.5)

    asyncio.run(run())
    return 0


async def orphan_guard(stop: asyncio.Event) -> None:
    """Set ``stop`` when the driver that started this process is gone."""
    parent = os.getppid()
    while not stop.is_set():
        if os.getppid() != parent:
            stop.set()
        await asyncio.sleep(1.0)


# --------------------------------------------------------------------------- client


def client_main(args: argparse.Namespace) -> int:
    """Connect, say ready, then run one round per ``go`` line on stdin until EOF."""
    import grpc

    async def run() -> None:
        async with grpc.aio.insecure_channel(args.target, options=CHANNEL_OPTIONS) as channel:
            await asyncio.wait_for(channel.channel_ready(), CONNECT_TIMEOUT_S)
            download = channel.unary_stream(DOWNLOAD)
            upload = channel.stream_unary(UPLOAD)
            print(json.dumps({"ready": True}), flush=True)
            loop = asyncio.get_running_loop()
            while (await loop.run_in_executor(None, sys.stdin.readline)).strip() == "go":
                cpu0, t0 = time.process_time(), time.perf_counter()
                chunks = [chunk async for chunk in download(b"")]
                t1 = time.perf_counter()
                got = int.from_bytes(await upload(iter(chunks)), "big")
                t2 = time.perf_counter()
                received = sum(len(c) for c in chunks)
                print(json.dumps({"download_s": t1 - t0, "upload_s": t2 - t1,
                                  "downloaded": received, "uploaded": got,
                                  "cpu_s": time.process_time() - cpu0}), flush=True)

    # Ctrl-C is the driver's to handle (it then stops this process with SIGTERM); exit at
    # once on SIGTERM, since a thread is blocked reading stdin.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    asyncio.run(run())
    return 0


# --------------------------------------------------------------------------- driver


class Children:
    """The server and client processes; ``stop`` ends every one still running, by PID."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, *extra: str) -> subprocess.Popen:
        cmd = [sys.executable, os.path.abspath(__file__), *extra]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True, bufsize=1)
        self.procs.append(proc)
        return proc

    def stop(self, timeout: float = 5.0) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def read_json(proc: subprocess.Popen, what: str) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"{what} (pid {proc.pid}) exited with {proc.wait()} before answering")
    return json.loads(line)


def spread(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 4), "max": round(max(values), 4)}


def driver_main(args: argparse.Namespace) -> int:
    load_at_start = round(os.getloadavg()[0], 2)
    children = Children()

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: a background job ignores it
        signal.signal(sig, on_term)
    try:
        server = children.start("--serve", "--bytes", str(args.bytes))
        target = f"127.0.0.1:{read_json(server, 'the server')['port']}"
        clients = [children.start("--client", "--target", target) for _ in range(args.clients)]
        for proc in clients:
            read_json(proc, "a client")
        log(f"server {server.pid} on {target}, {args.clients} clients "
            f"{[p.pid for p in clients]}: {args.bytes / 1e6:.1f} MB each way, "
            f"{args.repeat} round(s)")
        runs = []
        for k in range(args.repeat):
            server_cpu0 = cpu_seconds(server.pid)
            started = time.perf_counter()
            for proc in clients:
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
            reports = [read_json(proc, "a client") for proc in clients]
            round_s = time.perf_counter() - started
            for r in reports:
                if r["downloaded"] != args.bytes or r["uploaded"] != args.bytes:
                    raise RuntimeError(f"moved {r['downloaded']} / {r['uploaded']} bytes, "
                                       f"not {args.bytes}")
            runs.append({"round_s": round_s,
                         "download": [r["download_s"] for r in reports],
                         "upload": [r["upload_s"] for r in reports],
                         "client_cpu_s": sum(r["cpu_s"] for r in reports),
                         "server_cpu_s": cpu_seconds(server.pid) - server_cpu0})
            log(f"round {k + 1}: {round_s:.3f} s")
    except KeyboardInterrupt:
        log("interrupted; stopping the child processes")
        children.stop()
        return 130
    except Exception as exc:  # noqa: BLE001 - report it in the JSON line
        children.stop()
        print(json.dumps({"bench": "raw_grpc", "clients": args.clients, "bytes": args.bytes,
                          "error": f"{type(exc).__name__}: {exc}"}))
        return 2
    children.stop()

    def med(key: str, stat: str) -> float:
        return statistics.median(spread(r[key])[stat] for r in runs)

    round_s = statistics.median(r["round_s"] for r in runs)
    down_med, up_med = med("download", "median"), med("upload", "median")
    out = {
        "bench": "raw_grpc",
        "clients": args.clients,
        "bytes": args.bytes,
        "chunk_bytes": CHUNK,
        "repeat": args.repeat,
        "download_s": {"median": round(down_med, 4), "max": round(med("download", "max"), 4)},
        "upload_s": {"median": round(up_med, 4), "max": round(med("upload", "max"), 4)},
        "round_s": round(round_s, 4),
        "round_s_runs": [round(r["round_s"], 4) for r in runs],
        "mb_per_s": {  # MB = 10^6 bytes
            "round": round(2 * args.clients * args.bytes / round_s / 1e6, 1),
            "download_per_client": round(args.bytes / down_med / 1e6, 1),
            "upload_per_client": round(args.bytes / up_med / 1e6, 1),
        },
        "server_cpu_s": round(statistics.median(r["server_cpu_s"] for r in runs), 2),
        "client_cpu_s": round(statistics.median(r["client_cpu_s"] for r in runs), 2),
        "loadavg_1m": [load_at_start, round(os.getloadavg()[0], 2)],
    }
    print(json.dumps(out), flush=True)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=4, help="client processes (C)")
    p.add_argument("--mb", type=float, default=100.0, help="model size S in MB (10^6 bytes)")
    p.add_argument("--repeat", type=int, default=3, help="rounds; the figures are medians")
    # child entries (started by the driver, not by hand)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--target", help=argparse.SUPPRESS)
    p.add_argument("--bytes", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.clients <= 0 or args.mb <= 0 or args.repeat <= 0:
        p.error("--clients, --mb and --repeat must be positive")
    if not args.serve:
        args.bytes = args.bytes or int(args.mb * 1e6)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        return serve_main(args)
    if args.client:
        return client_main(args)
    return driver_main(args)


if __name__ == "__main__":
    sys.exit(main())
