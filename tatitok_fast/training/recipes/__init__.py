"""Model families the engine trains: maskgen (MaskGen-VQ / MaskGen-KL on token shards) and
tatitok (TA-TiTok tokenizers on image + caption shards)."""
