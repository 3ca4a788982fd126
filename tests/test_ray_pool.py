"""RayCombinerPool's handles (no Ray cluster: ``ray.get_actor`` is faked): looked up once,
and again after a call finds the actor gone."""

from __future__ import annotations

import pytest
import ray

from fedray.actors.controller.ray_pool import RayCombinerPool


class FakeActor:
    """An actor handle whose ``info`` answers, or raises ``error`` once it died."""

    def __init__(self, serial: int) -> None:
        self.serial, self.error = serial, None
        self.info = self

    def remote(self):
        async def answer():
            if self.error is not None:
                raise self.error
            return {"load": self.serial, "address": f"a{self.serial}"}
        return answer()


@pytest.mark.parametrize("error", [ray.exceptions.ActorDiedError(),
                                   ray.exceptions.ActorUnavailableError("restarting", b"1" * 16)])
async def test_handles_are_looked_up_once_and_again_after_the_actor_is_gone(monkeypatch, error):
    actors: list[FakeActor] = []

    def get_actor(name, namespace):
        actors.append(FakeActor(len(actors)))
        return actors[-1]

    monkeypatch.setattr(ray, "get_actor", get_actor)
    pool = RayCombinerPool(["combiner-0"], "ns")
    for _ in range(3):
        assert await pool._ask("combiner-0", "info") == {"load": 0, "address": "a0"}
    assert len(actors) == 1  # one lookup, not one per call
    actors[0].error = error
    with pytest.raises(type(error)):
        await pool._ask("combiner-0", "info")
    assert await pool.loads() == {"combiner-0": (1, "a1")}  # the actor started since
    assert len(actors) == 2
