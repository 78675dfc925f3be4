"""Repository tools: the demo, GPU-host scripts, plots."""
