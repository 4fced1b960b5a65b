"""Thin layers that let unmodified TRL trainers run on fastft models."""
