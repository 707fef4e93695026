"""Hateful Memes evaluation task."""
