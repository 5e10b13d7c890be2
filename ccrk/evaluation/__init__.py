"""Evaluation: retrieval metrics (Recall@K, MRV), benchmark loaders, ITC + ITM re-ranking, protocols, reports."""
