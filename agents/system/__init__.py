"""Worker memory and disk usage (SystemMonitor) published to `system.stats`."""
