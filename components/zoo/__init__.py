"""The classic generative families: VAE, GAN and WGAN-GP, normalizing flow, PixelCNN (one file each)."""
