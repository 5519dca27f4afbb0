"""Learning rules shared by every method: optimisers and the guarded parameter update."""
