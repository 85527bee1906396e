"""Checkpoint files: what a checkpoint holds (files.py) and the sealed format that detects a
damaged one (sealed.py)."""
