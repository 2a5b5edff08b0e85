"""Policy learner: `policy.PolicyLearner` (one DeepSpeed ZeRO rank, plain class) and
`group.LearnerGroup` (the ranks as Ray actors in a placement group)."""
