"""Corpus: recipes (files on disk -> records), the textual surrogate, template prompts, the build stage."""
