"""Training losses, importable without the engine:

    tokenizer.py      reconstruction + perceptual + GAN (+ LeCAM) + quantizer terms
    perceptual.py     LPIPS / ConvNeXt perceptual networks
    discriminator.py  the NLayer (StyleGAN-style) discriminator
    generator.py      MaskGen-VQ's masked-token cross-entropy
"""
