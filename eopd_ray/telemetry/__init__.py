"""What a run reports about itself: per-step metrics and their sinks, and gauges on
Ray's metrics endpoint.
"""
