"""Tokenizers: images -> tokens -> images."""
