"""Time-conditioned MLP for the 2D toys (reference/cld.md sec. 3.4: 4 hidden layers of 128, SiLU).

One class serves every toy role by its in/out widths:
  DDGAN generator      in = x_t (2),            z = (z_dim), out = x_0' (2)
  DDGAN discriminator  in = [x_{t-1}, x_t] (4),              out = logit (1)
  CLD score            in = [x, v] (4),                      out = v-score part (2)
  DDPM                 in = x_t (2),                         out = eps (2)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn

from fastsample.nets.layers import (TIME_EMBEDDINGS, InputFourierFeatures, check_fourier_fields,
                                    check_input, config_from_dict, time_features, zero_module)

TIME_MODES = ("concat", "add")


@dataclass(frozen=True)
class MLPConfig:
    in_dim: int = 2                         # width of the data input (CLD: 2d, x and v)
    out_dim: int = 2                        # output width (1 for a discriminator logit)
    hidden: int = 128                       # width of every hidden layer
    num_layers: int = 4                     # number of hidden layers
    z_dim: int = 0                          # latent z width (DDGAN generator); 0 = no z
    time_embedding: str = "sinusoidal"      # "sinusoidal" of time_scale*t, or "fourier_log" (CLD)
    time_dim: int = 32                      # width of the raw time features
    fourier_scale: float = 16.0             # std of Fourier frequencies (fourier_log only)
    time_scale: float = 1000.0              # sinusoidal multiplier: 1000 for t in [0, 1], 1 for a step index
    time_mode: str = "concat"               # "concat": [x, emb(t), z] is the input; "add": a projection of emb(t) (and z) is added to every hidden layer
    zero_init_out: bool = True              # zero the output layer so a fresh net outputs 0
    input_features: int = 0                 # random Fourier features of the input: m frequencies (0 = raw x only)
    input_scale: float = 1.0                # std of those frequencies, in cycles per unit of x

    def __post_init__(self):
        for name in ("in_dim", "out_dim", "hidden", "num_layers", "time_dim"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"MLPConfig.{name} = {getattr(self, name)}; must be >= 1")
        check_fourier_fields("MLPConfig", "input_features", self.input_features, "input_scale",
                             self.input_scale)
        if self.z_dim < 0:
            raise ValueError(f"MLPConfig.z_dim = {self.z_dim}; must be >= 0 (0 = no z)")
        if self.time_embedding not in TIME_EMBEDDINGS:
            raise ValueError(f"MLPConfig.time_embedding = {self.time_embedding!r}; "
                             f"choose one of {'|'.join(TIME_EMBEDDINGS)}")
        if self.time_mode not in TIME_MODES:
            raise ValueError(f"MLPConfig.time_mode = {self.time_mode!r}; choose one of {'|'.join(TIME_MODES)}")
        if self.time_dim % 2 != 0:
            raise ValueError(f"MLPConfig.time_dim = {self.time_dim}; must be even (sin and cos halves)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MLPConfig":
        return config_from_dict(cls, d)


class TimeMLP(nn.Module):
    """forward(x (N, in_dim), t (N,), z (N, z_dim) or None) -> (N, out_dim)."""

    def __init__(self, cfg: MLPConfig):
        super().__init__()
        if not isinstance(cfg, MLPConfig):
            raise TypeError(f"TimeMLP(cfg): cfg must be an MLPConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.features = time_features(cfg.time_embedding, cfg.time_dim, cfg.fourier_scale,
                                      cfg.time_scale)
        cond_dim = cfg.time_dim + cfg.z_dim
        self.act = nn.SiLU()
        self.inputs = (InputFourierFeatures(cfg.in_dim, cfg.input_features, cfg.input_scale)
                       if cfg.input_features else None)
        x_dim = self.inputs.out_dim if self.inputs is not None else cfg.in_dim
        if cfg.time_mode == "concat":
            d = x_dim + cond_dim
            self.cond = None
        else:
            d = x_dim
            # One projection for all layers, split per layer: the condition shifts each
            # pre-activation, as time embeddings do in the U-Net's blocks.
            self.cond = nn.Linear(cond_dim, cfg.num_layers * cfg.hidden)
        self.hidden = nn.ModuleList()
        for _ in range(cfg.num_layers):
            self.hidden.append(nn.Linear(d, cfg.hidden))
            d = cfg.hidden
        self.out = nn.Linear(d, cfg.out_dim)
        if cfg.zero_init_out:
            zero_module(self.out)

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.cfg
        N = x.shape[0]
        check_input("x", x, (N, cfg.in_dim))
        check_input("t", t, (N,))
        c = self.features(t).to(x.dtype)  # (N, time_dim)
        if cfg.z_dim > 0:
            if z is None:
                raise ValueError(f"z is None but MLPConfig.z_dim = {cfg.z_dim}; pass z of shape (N, {cfg.z_dim})")
            check_input("z", z, (N, cfg.z_dim))
            c = torch.cat([c, z], dim=1)
        elif z is not None:
            raise ValueError("z was given but MLPConfig.z_dim = 0; this net takes no z")

        if self.inputs is not None:
            x = self.inputs(x)
        if self.cond is None:
            h = torch.cat([x, c], dim=1)
            for layer in self.hidden:
                h = self.act(layer(h))
        else:
            shifts = self.cond(c).chunk(cfg.num_layers, dim=1)  # num_layers x (N, hidden)
            h = x
            for layer, shift in zip(self.hidden, shifts):
                h = self.act(layer(h) + shift)
        return self.out(h)
