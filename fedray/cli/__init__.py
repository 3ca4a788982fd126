"""The ``fedray`` command: one module per command group (the edge's own group is
``fedray.edge.cli``). ``main`` is the console script's entry point."""
