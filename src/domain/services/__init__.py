"""The domain services: the agent loop, runs, access from any instance, the approval gate and desk."""
