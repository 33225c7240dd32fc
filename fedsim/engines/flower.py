"""Flower engine (placeholder until it lands; registers nothing)."""
