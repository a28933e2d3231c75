"""Networks: small U-Net (+ DDGAN discriminator), toy MLP, LSGM VAE. See each module's header."""

from fastsample.nets.layers import param_count
from fastsample.nets.mlp import MLPConfig, TimeMLP
from fastsample.nets.unet import (UNET_PRESETS, Discriminator, DiscriminatorConfig, UNet,
                                  UNetConfig)
from fastsample.nets.vae import (VAE_PRESETS, Decoder, Encoder, VAEConfig, categorical_log_prob,
                                 categorical_mean, categorical_sample)

__all__ = [
    "param_count", "MLPConfig", "TimeMLP", "UNET_PRESETS", "UNetConfig", "UNet",
    "DiscriminatorConfig", "Discriminator", "VAE_PRESETS", "VAEConfig", "Encoder", "Decoder",
    "categorical_log_prob", "categorical_mean", "categorical_sample",
]
