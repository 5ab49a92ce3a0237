"""Evaluation of the trained ALM: benchmarks, scoring, controls, inference, the eval stage."""
