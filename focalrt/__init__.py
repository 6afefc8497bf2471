"""focalrt: an edge inference runtime for face-region vision-language models."""

__version__ = "0.1.0"
