"""ragseek: RAG over real documents, a DeepSeek-style transformer and post-training, on one CPU."""

__version__ = "0.1.0"
