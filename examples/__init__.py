"""Examples: A2A agents, workflow plans and a registry to run them together."""
