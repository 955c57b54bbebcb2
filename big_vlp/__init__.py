"""big_vlp: vision-language pretraining (CLIP, SigLIP and descendants) in JAX/Flax."""

__version__ = "0.1.0"
