"""Run storage: a local directory or any pyarrow.fs URI, checkpoints, run directories
and the one-driver claim.
"""
