"""Communication records per agent and kind (track_communications, views, `agentstream comms`)."""
