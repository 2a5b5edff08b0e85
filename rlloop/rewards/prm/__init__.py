"""Process reward models: the value-head PRM, its scoring service, and TD training."""
