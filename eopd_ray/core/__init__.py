"""The pure core: wire types, micro-batch plans, the EOPD loss, forward passes, prompts
and run-time invariants. Imports no Ray, vLLM or DeepSpeed.
"""
