"""The executor Faust app (``faust -A streams.app worker``); it arrives with the end-to-end issue."""
