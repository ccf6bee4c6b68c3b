"""The HTTP-Kafka bridge Faust app (``faust -A agents_bridge.app worker``); it arrives with the end-to-end issue."""
