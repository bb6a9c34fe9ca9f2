"""The pipeline's machinery: the Faust app, settings, topics, tables, codecs, resilience,
client and CLI. Imports `schemas`, never `agents` (Faust autodiscovery loads those)."""
