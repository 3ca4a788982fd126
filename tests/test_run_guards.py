"""The guards around running a federation, piece by piece. Here: Ray's errors as fedray's
at the driver's boundary."""

from __future__ import annotations

import pytest

from fedray.errors import ConfigError, FedrayError, SessionError


@pytest.mark.integration
def test_ray_errors_become_fedray_errors_without_a_remote_traceback(ray_session):
    import ray

    from fedray.federation import ray_errors

    @ray.remote(num_cpus=0, max_restarts=0)
    class Flaky:
        def fedray(self) -> None:
            raise ConfigError("combiners.count must be greater than 0")

        def bug(self) -> None:
            raise KeyError("oops")

        def hang(self) -> None:
            import time

            time.sleep(30)

    actor = Flaky.remote()
    with pytest.raises(ConfigError) as info, ray_errors("asking"):
        ray.get(actor.fedray.remote())
    assert type(info.value) is ConfigError and str(info.value) == \
        "combiners.count must be greater than 0"
    with pytest.raises(SessionError) as info, ray_errors("asking"):
        ray.get(actor.bug.remote())
    assert str(info.value) == "asking: KeyError: 'oops'"
    with pytest.raises(SessionError, match="asking: no answer in time"), ray_errors("asking"):
        ray.get(actor.hang.remote(), timeout=0.2)
    ray.kill(actor, no_restart=True)
    with pytest.raises(FedrayError) as info, ray_errors("asking"):
        ray.get(actor.bug.remote())
    assert isinstance(info.value, SessionError) and "\n" not in str(info.value)
    assert str(info.value).startswith("asking: ")
