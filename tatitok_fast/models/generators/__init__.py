"""Generators: conditions -> tokens. The MaskGen classes are re-exported by maskgen.py."""
