"""The analyses: distances, spectral inclusion, anatomy, maps, tests, token dynamics."""
