"""eopd-ray: entropy-aware on-policy distillation of language models on Ray, vLLM and DeepSpeed.

The pure core (`config`, `batch`, `loss`) imports neither Ray, vLLM nor DeepSpeed.
"""

__version__ = "0.1.0"
