"""CCRk: the cross-lingual cross-modal retrieval model (KDD'24), its trainer, evaluation and the `ccrk` CLI."""
__version__ = "0.1.0"
