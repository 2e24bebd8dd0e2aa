"""maskdiff: masked autoencoders and diffusion transformers as one Lightning machine."""

__version__ = "0.1.0"
