"""Small Flower apps written the way Flower's examples write them (used by tests/test_flower.py)."""
