"""Q-RM (arXiv 2505.23363): a token-level Q-function reward model trained from preference pairs.

- `model.TokenQModel`: HF backbone + `Linear(H, 1, bias=False)` head, one score s_t per token.
- `loss`: the pairwise loss, pairwise accuracy and the per-token reward normalisation (pure math).
- `data`: preference-pair files (`prompt`, `chosen`, `rejected`) and pairs built from verified rollouts.
- `trainer.QRMTrainer`: the update (DeepSpeed engine or plain AdamW).
- `service.QRMScorer` / `QRMService`: per-token rewards for the RL loop.
"""
