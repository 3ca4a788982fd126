"""Example federations that ship with fedray (workloads, not library code)."""
