"""`corral dev`: the everyday loop of publishing an agent's directory on every change."""
