"""`make run`: the whole platform on one machine, as separate processes."""
