"""The edge side of declared stages, against a scripted federation over real gRPC: a task
of a kind the client does not know is refused (never run as training), a stage of kind
STAGE is answered by the strategy's client half, and a half runs only when allowed."""

from __future__ import annotations

import asyncio
import hashlib
import json

import numpy as np
import pytest

from fedray.bridge.proto import fedray_v1_pb2 as pb
from fedray.edge.client import EdgeRunner, EdgeSettings
from fedray.edge.halves import allowed
from fedray.edge.workers import CallbackWorker
from fedray.serialization import decode, encode
from tests.edge_server import ScriptedFederation, task
from tests.waiting import async_wait_until

HALF = "tests.stage_strategies:SurveyHalf"
MODEL = encode({"w": np.zeros(4, np.float32)})


@pytest.fixture
async def federation():
    fed = await ScriptedFederation.start()
    try:
        yield fed
    finally:
        await fed.close()


class Client:
    """An ``EdgeRunner`` whose worker counts what it ran, serving in the test's loop."""

    def __init__(self, gateway: str, **settings) -> None:
        self.trained = 0
        self.lines: list[str] = []
        worker = CallbackWorker(self._train, lambda params, config: (1, {"loss": 0.5}))
        self.runner = EdgeRunner(worker, EdgeSettings(gateway=gateway, name="site-a",
                                                      backoff_initial_s=0.05, **settings),
                                 say=self.lines.append)
        self.future = asyncio.ensure_future(self.runner.run())

    def _train(self, params, config):
        self.trained += 1
        return {k: v + 1 for k, v in params.items()}, 10, {}

    async def close(self) -> None:
        self.runner.stop.set()
        await asyncio.wait_for(self.future, 10)


def test_only_fedrays_own_halves_run_unless_allowed():
    assert allowed("fedray.strategies.secagg_client:Half", ())
    assert not allowed("fedrayx.evil:Half", ())
    assert not allowed("tests.stage_strategies:SurveyHalf", ())
    assert allowed("tests.stage_strategies:SurveyHalf", ("tests",))
    assert allowed("tests.stage_strategies:SurveyHalf", ("tests.stage_strategies",))
    assert not allowed("tests.stage_strategies:SurveyHalf", ("tests.stage",))


async def test_a_task_of_an_unknown_kind_is_refused_and_the_client_stays_up(federation):
    fed = federation.servicer
    fed.serve(MODEL)
    client = Client(federation.gateway)
    fed.send(pb.Task(task_id="t-unknown", kind=7, session_id="s1", round=1,
                     model_id=task(model=MODEL).model_id, model_size=len(MODEL)))
    fed.send(task(kind="train", model=MODEL))  # a task it knows, after the one it does not
    await async_wait_until(lambda: fed.updates, "the known task to train",
                           describe=lambda: client.lines)
    await client.close()
    refused = [e for e in fed.events if e.task_id == "t-unknown"]
    assert len(refused) == 1 and refused[0].level == "error"
    assert refused[0].error_class == "UnknownTaskKind"
    assert "kind 7, which this client does not know" in refused[0].message
    assert client.trained == 1  # only the known task ran; the unknown one never trained


async def test_a_stage_of_the_strategys_own_is_answered_by_its_client_half(federation):
    fed = federation.servicer
    client = Client(federation.gateway, client_halves=("tests",))
    fed.send(pb.Task(task_id="t-survey", kind=pb.TASK_KIND_STAGE, session_id="s1", round=2,
                     stage="survey", payload=b"site-a/2", client_half=HALF))
    await async_wait_until(lambda: fed.stage_replies, "a stage reply",
                           describe=lambda: client.lines)
    await client.close()
    reply = fed.stage_replies[0]
    assert (reply.task_id, reply.stage, reply.round) == ("t-survey", "survey", 2)
    answer = json.loads(reply.payload)
    assert answer == {"nonce": b"site-a/2".hex(), "model": False, "seen": ["survey"]}
    assert client.trained == 0 and not fed.sent  # no model was fetched for it


async def test_the_client_half_encodes_every_update_before_it_is_sent(federation):
    fed = federation.servicer
    fed.serve(MODEL)
    client = Client(federation.gateway, client_halves=("tests",))
    fed.send(task(kind="train", model=MODEL, client_half=HALF, stage="train"))
    await async_wait_until(lambda: fed.update_bytes, "an update",
                           describe=lambda: client.lines)
    await client.close()
    sent = decode(fed.update_bytes[0])
    np.testing.assert_array_equal(sent["w"], np.full(4, 2.0, np.float32))  # train +1, half +1
    # the header describes the encoded bytes
    assert fed.updates[0].sha256 == hashlib.sha256(fed.update_bytes[0]).hexdigest()


async def test_a_client_half_that_is_not_allowed_fails_the_task_with_a_hint(federation):
    fed = federation.servicer
    client = Client(federation.gateway)
    fed.send(pb.Task(task_id="t-survey", kind=pb.TASK_KIND_STAGE, session_id="s1", round=1,
                     stage="survey", client_half=HALF))
    await async_wait_until(lambda: fed.events, "the refusal",
                           describe=lambda: client.lines)
    await client.close()
    assert fed.events[0].task_id == "t-survey" and fed.events[0].level == "error"
    assert "--allow-client-half tests.stage_strategies" in fed.events[0].message
    assert not fed.stage_replies


async def test_the_client_half_gives_the_users_code_the_model_it_rebuilt(federation):
    fed = federation.servicer
    fed.serve(MODEL)
    client = Client(federation.gateway, client_halves=("tests",))
    fed.send(task(kind="train", model=MODEL, stage="train",
                  client_half="tests.stage_strategies:RebuildHalf"))
    await async_wait_until(lambda: fed.update_bytes, "an update",
                           describe=lambda: client.lines)
    await client.close()
    np.testing.assert_array_equal(decode(fed.update_bytes[0])["w"], np.full(4, 11.0, np.float32))
