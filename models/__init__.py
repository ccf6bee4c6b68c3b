"""Pure data and rules, no I/O: plans, input mapping, messages, the run state machine and the database records."""
