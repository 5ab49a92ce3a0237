"""ralm: ALARM (self-generated, self-rephrased targets) on Ray."""
__version__ = "0.1.0"
