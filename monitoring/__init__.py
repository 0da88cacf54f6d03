"""Monitoring that ships with Quill: the pynvml GPU exporter (`quill gpu-exporter`), the
Prometheus scrape configs and rules (`prometheus/`) and the Grafana dashboard (`grafana/`).

Nothing here imports torch or Ray: the exporter must start in well under a second on a GPU node.
"""
