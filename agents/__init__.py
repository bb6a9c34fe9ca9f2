"""The pipeline's Faust agents, one subpackage each; loaded by Faust autodiscovery.

Each subpackage keeps its decision logic in plain modules (unit-tested without Kafka) and a
thin `agent.py` that wires that logic to topics and tables.
"""
