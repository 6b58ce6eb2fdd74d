"""Models, one folder per role:

    tokenizers/  images <-> tokens (TA-TiTok)
    generators/  conditions -> tokens (MaskGen-VQ / MaskGen-KL, their MM-DiT, diffusion head,
                 sampling schedules and CUDA-graph cache)
    nn/          building blocks both use (fused projections, attention, convs) and the
                 from_pretrained / save_pretrained base class

The training losses are not models: tatitok_fast.losses.
"""
