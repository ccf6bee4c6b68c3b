"""Tests of the example agents."""
