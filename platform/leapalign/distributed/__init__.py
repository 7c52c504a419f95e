"""Ray at the edges: the only part of `leapalign` that imports ray (reward actors, Ray Train)."""
