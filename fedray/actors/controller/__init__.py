"""The controller: sessions and rounds (session and async runners), the reduce across
combiners, the gateway clients ask for a combiner, and the pool it reaches combiners by.

``actor`` is the Ray actor; everything else here is plain asyncio over the ``CombinerPool``
protocol, so the runners are tested without Ray (tests/simfed.py).
"""
