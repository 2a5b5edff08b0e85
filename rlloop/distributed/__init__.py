"""Ray plumbing shared by every actor: cluster start-up and safe remote calls."""
