"""Task families: how a client's private data is generated and how a model is scored."""
