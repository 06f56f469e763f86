"""Where pi_old comes from, decided alike by the learner and the driver's streamed step.

pi_old (the policy that sampled, for the PPO ratio) is normally recomputed by a separate
eval-mode forward of the sampled tokens before any update. When the step makes a single update,
that update's own forward, detached, gives the same numbers with the same weights: one student
forward fewer per step (`learner.old_logprobs_from_update`). Train-mode dropout would make that
forward a different distribution, so a student with dropout keeps the separate forward.
"""

from __future__ import annotations

import torch


def old_from_update(learner, num_updates: int, dropout: bool) -> bool:
    """Whether a step takes pi_old from its update's own forward, detached: `learner` asks for
    it (old_logprobs: recompute, old_logprobs_from_update), the step makes one optimizer update
    (the weights stay those that sampled until it is applied) and the student has no dropout
    (that forward runs in train mode). The learner decides with it, and the driver too: a
    streamed step then asks for no pi_old per group."""
    return (
        learner.old_logprobs == "recompute"
        and learner.old_logprobs_from_update
        and num_updates == 1
        and not dropout
    )


def has_dropout(module: torch.nn.Module) -> bool:
    """Whether a forward in train mode differs from eval mode's by dropout: an active
    nn.Dropout, or a Hugging Face config's *dropout* rate above 0 (attention dropout is applied
    functionally, without a module)."""
    for m in module.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0:
            return True
        config = getattr(m, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            rates = [v for k, v in config.to_dict().items() if "dropout" in k]
            if any(isinstance(v, int | float) and v > 0 for v in rates):
                return True
    return False
