"""Judging answers (math equivalence, Avg@k, Pass@k) and summarising results (seed
statistics, plots).
"""
