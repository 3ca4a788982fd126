"""The Python API of a running federation (``fedray.connect``); HTTP only, no server library."""

from fedray.api.client import Federation, Models, Session, connect

__all__ = ["Federation", "Models", "Session", "connect"]
