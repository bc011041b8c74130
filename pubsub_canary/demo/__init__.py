"""``pubsub-canary demo``: a canary rollout end to end on the embedded defaults."""
