"""Layers shared by every model family, and the pretrained-model base class."""
