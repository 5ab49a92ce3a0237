"""Corpus recipes: small declarative mappings from files on disk to clip records.

A recipe says where the manifest is, how to read a row, where the row's audio is, and which columns
become the transcript / caption / metadata. `scan()` turns it into `RawClip`s (or `BadRow`s for rows
it cannot use: a malformed manifest row becomes a reject, never a crash). Register new layouts with
`register_recipe`; select them by name in `corpus.recipes` of the config.
"""

from ralm.corpus.recipes import layouts  # noqa: F401,E402  (registers the built-in recipes)
from ralm.corpus.recipes.base import (
    RECIPES,
    BadRow,
    RawClip,
    Recipe,
    TableRecipe,
    get_recipe,
    register_recipe,
)

__all__ = ["RECIPES", "BadRow", "RawClip", "Recipe", "TableRecipe", "get_recipe", "register_recipe"]
