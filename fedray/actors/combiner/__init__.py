"""A combiner: its clients' connections, task dispatch, model streaming, update intake
(checks and streaming aggregation) and its share of each round.

``actor`` is the Ray actor and ``servicer`` the gRPC face; ``core`` and what it uses are
plain asyncio that import neither grpc nor Ray, so tests drive them in-process.
"""
