"""Generators turn a job spec into files. ``procedural`` is the default and
the only backend without model weights; model backends plug in behind the
same :class:`~tasks.generators.base.Generator` protocol."""
from __future__ import annotations

from orchestrator.config import ConfigurationError, Settings
from orchestrator.jobtypes import Family
from tasks.generators.base import Generator


def get_generator(family: Family, settings: Settings) -> Generator:
    """The configured generator of a family: ``procedural``, or ``diffusers``
    (loads the weights now; needs the ``models`` extra)."""
    backend, path = ((settings.sdxl_backend, settings.sdxl_model_path) if family is Family.SDXL
                     else (settings.wan_backend, settings.wan_model_path))
    if backend == "diffusers" and path is not None:
        from tasks.generators.diffusion import SDXLGenerator, WanGenerator

        try:
            import diffusers  # noqa: F401
            import torch  # noqa: F401
        except ImportError as e:
            raise ConfigurationError(
                f"{family.value.upper()}_BACKEND=diffusers needs the 'models' extra "
                f"(pip install -e '.[models]'): {e}") from e
        device, dtype, max_steps = settings.model_device, settings.model_dtype, settings.model_max_steps
        if family is Family.SDXL:
            return SDXLGenerator(path, config_path=settings.sdxl_config_path, device=device,
                                 dtype=dtype, max_steps=max_steps)
        return WanGenerator(path, device=device, dtype=dtype, max_steps=max_steps)
    from tasks.generators.procedural import ProceduralGenerator

    return ProceduralGenerator()
