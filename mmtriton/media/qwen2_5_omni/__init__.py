"""Qwen2.5-Omni's media conventions: its processor's image sizes and patch rows, done with DALI."""
