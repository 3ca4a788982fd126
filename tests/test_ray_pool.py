"""RayCombinerPool (no Ray cluster: ``ray.get_actor`` is faked): handles looked up once,
and again after a call finds the actor gone; every Ray error a call raises leaves the pool
as fedray's own, naming the combiner and the round."""

from __future__ import annotations

import pytest
import ray

from fedray.actors.controller.ray_pool import RayCombinerPool, translate
from fedray.errors import CombinerFailed, CombinerLost, CombinerTimeout, UnknownSession


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
    with pytest.raises(CombinerLost, match="combiner combiner-0 \\(round 4\\): ") as lost:
        await pool._ask("combiner-0", "info", round_=4)
    assert (lost.value.combiner, lost.value.round) == ("combiner-0", 4)
    assert await pool.loads() == {"combiner-0": (1, "a1")}  # the actor started since
    assert len(actors) == 2


def _task_error(cause: BaseException) -> ray.exceptions.RayTaskError:
    """What Ray raises for an exception raised inside an actor method."""
    return ray.exceptions.RayTaskError("run_round", "Traceback ...", cause).as_instanceof_cause()


@pytest.mark.parametrize(("error", "kind", "why"), [
    (ray.exceptions.ActorDiedError(), CombinerLost, "died (ActorDiedError)"),
    (ray.exceptions.ActorUnavailableError("restarting", b"1" * 16), CombinerLost,
     "unreachable, Ray is restarting it"),
    (ray.exceptions.OwnerDiedError("1" * 56, "", ""), CombinerLost, "was lost"),
    (ray.exceptions.GetTimeoutError("late"), CombinerTimeout, "no answer in time"),
    (_task_error(ZeroDivisionError("float division by zero")), CombinerFailed,
     "failed with ZeroDivisionError: float division by zero"),
    (RuntimeError("an actor method that is not there"), CombinerFailed, "RuntimeError"),
])
def test_ray_errors_become_fedrays_own_naming_the_combiner_and_the_round(error, kind, why):
    translated = translate(error, "combiner-1", 3)
    assert type(translated) is kind
    assert str(translated).startswith("combiner combiner-1 (round 3): ")
    assert why in translated.why


def test_a_fedray_error_raised_inside_the_combiner_comes_through_as_it_was():
    translated = translate(_task_error(UnknownSession("combiner-0 has no strategy for s1")),
                           "combiner-0", 1)
    assert type(translated) is UnknownSession
    assert str(translated) == "combiner-0 has no strategy for s1"


async def test_a_combiner_that_is_not_there_is_lost(monkeypatch):
    def get_actor(name, namespace):
        raise ValueError(f"Failed to look up actor with name '{name}'")

    monkeypatch.setattr(ray, "get_actor", get_actor)
    with pytest.raises(CombinerLost, match="not found in ns"):
        await RayCombinerPool(["combiner-0"], "ns")._ask("combiner-0", "info")
