"""Rollout generation: engines (HF generate, vLLM), the rollout worker, and reasoning-step boundaries."""
