"""The model (paper 3.1, 3.2, 3.4): SDXL with the image-prompt adapter (resampler, masked attention, subject
encoders), relation LoRAs, the pipeline, its configs and presets: everything ``load_pipeline`` needs.

Modules are imported on use (``dreamrelation.model.config`` stays a plain-dataclass import, without torch).
"""
