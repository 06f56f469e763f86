"""The three roles (rollout, teacher, learner) and how student weights move between them."""
