"""The `gfspy` administration command."""
