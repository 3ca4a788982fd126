"""Strategies that declare stages of their own, as docs/strategies.md builds them:
``session.aggregator: examples.custom_stage.power_of_choice:PowerOfChoice``."""
