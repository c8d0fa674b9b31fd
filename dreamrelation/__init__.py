"""DreamRelation: relation-aware customized image generation on SDXL (the model library).

Torch, diffusers, transformers and peft only: no Ray, no pydantic. Heavy modules are imported on use, so
``import dreamrelation`` stays cheap.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "load_pipeline"]


def load_pipeline(*args, **kwargs):
    """See :func:`dreamrelation.model.presets.load_pipeline`."""
    from .model.presets import load_pipeline as _load

    return _load(*args, **kwargs)
