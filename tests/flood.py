"""A flood of wrong-token calls, as its own process: ``python -m tests.flood ADDRESS
SECONDS RATE`` sends about RATE Heartbeats a second, each with a fresh wrong token, for
SECONDS, and prints one JSON line: how many were sent and how each ended."""

from __future__ import annotations

import asyncio
import collections
import json
import sys
import time

import grpc

from fedray.bridge.proto import fedray_v1_pb2 as pb
from fedray.bridge.proto import fedray_v1_pb2_grpc as pb_grpc
from fedray.bridge.wire import auth_metadata

CONCURRENCY = 2000  # calls in flight at once, at most: enough to fill a slow server


async def flood(address: str, seconds: float, rate: float) -> dict:
    codes: collections.Counter[str] = collections.Counter()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.CombinerStub(channel)
        await channel.channel_ready()
        slots = asyncio.Semaphore(CONCURRENCY)

        async def one(i: int) -> None:
            try:
                await stub.Heartbeat(pb.HeartbeatRequest(client_id="x"),
                                     metadata=auth_metadata(f"wrong-{i}"), timeout=5)
                codes["OK"] += 1
            except grpc.aio.AioRpcError as exc:
                codes[exc.code().name] += 1
            finally:
                slots.release()

        started, sent, tasks = time.monotonic(), 0, set()
        while (now := time.monotonic()) - started < seconds:
            due = int((now - started) * rate) - sent
            for _ in range(max(due, 0)):
                await slots.acquire()
                task = asyncio.ensure_future(one(sent))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                sent += 1
            await asyncio.sleep(0.005)  # behaviour: the flood's own pacing
        await asyncio.gather(*tasks)
    return {"sent": sent, "seconds": time.monotonic() - started, "codes": dict(codes)}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(flood(sys.argv[1], float(sys.argv[2]), float(sys.argv[3])))),
          flush=True)
