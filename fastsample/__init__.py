"""fastsample: fast diffusion sampling (DDGAN, CLD + SSCS, LSGM) with a VP-SDE/DDPM baseline.

See DESIGN.md (in the steering repo's shared/) for the layout and the contracts between parts.
"""

__version__ = "0.1.0"
