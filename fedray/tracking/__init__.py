"""Tracking: the history of sessions, rounds, models, clients and events, in MongoDB.

``TrackingStore`` is the only code that talks to the database (pymongo's API, so a real
MongoDB and the embedded ``nx-27017`` both work; ``mongo`` is how it talks, ``indexes``
what it indexes); ``schema`` is what each collection's documents are, and the store
checks every write against it (``checker``; docs/tracking.md publishes it);
``TrackingWriter`` lets actors write without blocking their event loop or losing writes
during an outage (``write_queue`` bounds what waits); ``documents`` builds what they
store; ``embedded`` runs the default local server (``loopback`` probes for it); ``query``
and ``tables`` (imported on their own, they need rich) serve the CLI.

This package imports nothing itself: ``fedray.tracking.schema`` or ``.resume`` load without
pymongo, and each module is imported by its own name.
"""
