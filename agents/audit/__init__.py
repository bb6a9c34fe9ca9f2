"""Audit and recovery: rebuild tables from history, checkpoints, chain verification and
activity reports (`agentstream rebuild|checkpoints|audit`)."""
