"""lunar-lens."""
