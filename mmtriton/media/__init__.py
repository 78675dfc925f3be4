"""Media in: checks on raw image and audio bytes, the DALI runner and the preprocessing models' logic."""
