"""Example A2A agents built with the official a2a-sdk: researcher, summarizer, reviewer.

Each is runnable as ``python -m examples.agents.<name>``; see :mod:`examples.agents.server`
for the flags that make them slow, flaky or broken on purpose.
"""
