"""/health, /ready and /metrics; component health transitions on `pipeline.health`."""
