"""The node daemon: wiring, peers, message handlers, round schedules, checkpoints, metrics."""
