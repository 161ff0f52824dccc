"""raydora's benchmarks: scripts run as modules (``python -m bench.<name>``) and the helpers they share."""
