"""The gRPC bridge between edge clients and the federation's servers.

What both ends share, or the servers need without Ray: the protocol (``proto``), the
conversions between its messages and fedray's dataclasses (``wire``), TLS, the server
factory with its limits (``server``, ``limits``), and who may call (``auth``,
``client_tokens``, ``keys``). The edge imports ``wire``, ``tls`` and ``proto`` only.
"""
