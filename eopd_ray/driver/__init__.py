"""The driver: the step loop, recovery, evaluation during training, Ray actors and
placement, stopping and progress.
"""
