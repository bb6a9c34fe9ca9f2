"""Metric samples → windowed aggregates per series and label set (collect_metrics, views)."""
