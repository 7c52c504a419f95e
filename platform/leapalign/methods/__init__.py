"""Alignment methods as pure functions of a velocity field, latents and a sigma grid (no Ray)."""
