"""The techniques at the package root, one per module."""
