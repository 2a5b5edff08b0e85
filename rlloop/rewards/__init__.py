"""Rewards: rule-based verifiers and process reward models."""
