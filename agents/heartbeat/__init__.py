"""Agent heartbeats → up/down status (HeartbeatMonitor, track_heartbeats, views, CLI)."""
