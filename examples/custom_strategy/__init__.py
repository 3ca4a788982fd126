"""A user's own strategy, as docs/strategies.md builds it: ``session.aggregator:
examples.custom_strategy.clipped:ClippedFedAvg``."""
