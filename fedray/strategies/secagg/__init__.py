"""Secure aggregation (SecAgg+, Bell et al., CCS 2020): no server tier sees one update.

The protocol's core, as pure code over typed messages (no I/O, no Ray, no gRPC):

    shamir      t-of-n sharing of byte secrets over GF(2^127 - 1)
    quantize    clipping and fixed point in Z_{2^32}, with the headroom and error bound
    keys        X25519 key pairs, HKDF-derived pairwise seeds, end-to-end envelopes
    masks       the ChaCha20 PRG into uint32 vectors, and how masks are added
    graph       the sparse random neighbour graph and its degree and threshold
    messages    what the four stages send
    client      a client's side of a round
    fold        a combiner's side: the ring sum of masked vectors
    server      the controller's side: relay, reduce across combiners, unmask
    inprocess   one round with every party in one process (tests, bench)

Nothing here is imported by ``fedray.strategies``: the package is loaded by its own
strategy when a session names it.
"""
