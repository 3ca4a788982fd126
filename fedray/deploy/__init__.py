"""Starting a federation on Ray from the driver process (``fedray run``, ``fedray demo``,
a Ray job): the config file and its checks, the run lock and signals, deploying and
joining actors, following a session, and ``fedray status``.
"""
