"""Forward processes and their exact scalar formulas, computed in float64.

vp.py: VP-SDE (linear beta), geometric VP-SDE, DDGAN's T-step schedule + posterior, DDPM schedule.
cld.py: critically-damped Langevin diffusion: kernel, HSM scalars, SSCS / EM step coefficients.
This package imports nothing else of fastsample.
"""

from .cld import CLD, CLDConfig, E3, EMStep, LinearStep, SSCSPlan, SSCSStep, compose
from .vp import (DDGANSchedule, DDPMSchedule, GeometricVPSDE, VPSDE, as_float64, batch_coeff,
                 ddgan_schedule)

__all__ = ["CLD", "CLDConfig", "E3", "EMStep", "LinearStep", "SSCSPlan", "SSCSStep", "compose",
           "DDGANSchedule", "DDPMSchedule", "GeometricVPSDE", "VPSDE", "as_float64", "batch_coeff",
           "ddgan_schedule"]
