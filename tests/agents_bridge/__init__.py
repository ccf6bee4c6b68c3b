"""Tests of the bridge: the A2A wire format and the calls."""
