"""CPU acceleration of the Twin-VAE, applied explicitly: ``accelerate(model, device)``.

The models in `twinvae.models` are plain PyTorch, as the papers draw them. `accelerate` swaps
some of their layers, in place, for subclasses (`modules`) that compute the same function
faster when training on the CPU: fused C kernels (`cpu_kernels`, real torch ops), other
formulations of some convolutions (`functional`), random draws and batch-norm statistics that
follow independent passes (`passes`). The state-dict keys stay those of the plain model.

What it requires and gives: two domains' passes may run side by side on two threads only when
every layer draws its random numbers and updates its batch-norm statistics through `passes`;
`require_independent_passes` checks that (the threaded training step calls it) and names the
layers that would race.
"""

from twinvae.accel.convert import (
    NotAcceleratedError,
    accelerate,
    require_independent_passes,
    thread_unsafe_layers,
    uses_cpu_kernels,
)
from twinvae.accel.passes import (
    RunningUpdate,
    apply_running_updates,
    generator,
    independent_pass,
)

__all__ = [
    "NotAcceleratedError",
    "RunningUpdate",
    "accelerate",
    "apply_running_updates",
    "generator",
    "independent_pass",
    "require_independent_passes",
    "thread_unsafe_layers",
    "uses_cpu_kernels",
]
