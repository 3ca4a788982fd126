"""The long-lived federation: ``fedray serve``, its HTTP API and its web view."""
