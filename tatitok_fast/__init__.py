"""tatitok_fast."""
