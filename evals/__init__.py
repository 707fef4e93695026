"""Benchmark tasks under missing modalities (MM-IMDb, Hateful Memes, easy-VQA)."""
