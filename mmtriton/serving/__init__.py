"""Running Triton: the server launcher and its ports, the TP=2 launcher, the liveness probe, engine folders and configs."""
