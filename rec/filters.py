"""What one request narrows its answer to: only some categories, none of others, and whether
items the user already acted on may come back. Recall leaves the excluded items out of every
source (so a narrow filter still fills the list), and the final step checks them again."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rec.catalog import Catalog


@dataclass(frozen=True, slots=True)
class Filters:
    categories: frozenset[str] | None = None  # None: any category (and items without one)
    exclude_categories: frozenset[str] = frozenset()
    include_seen: bool = False

    @property
    def narrows(self) -> bool:
        return self.categories is not None or bool(self.exclude_categories)

    def named(self) -> set[str]:
        """Every category the request names."""
        return set(self.categories or ()) | set(self.exclude_categories)

    def allows(self, category: str | None) -> bool:
        if self.categories is not None and category not in self.categories:
            return False
        return category not in self.exclude_categories

    def blocked(self, seen: frozenset[str]) -> frozenset[str]:
        """The items a request leaves out for having been seen."""
        return frozenset() if self.include_seen else seen

    def outside(self, catalog: Catalog) -> np.ndarray:
        """Indices of the catalogue's items the category filters leave out (sorted)."""
        if not self.narrows:
            return np.zeros(0, np.int64)
        codes = catalog.category_codes(np.arange(len(catalog)))
        out = np.zeros(len(codes), bool)
        if self.categories is not None:
            out |= ~np.isin(codes, [catalog.code(c) for c in self.categories])
        if self.exclude_categories:
            out |= np.isin(codes, [catalog.code(c) for c in self.exclude_categories])
        return np.flatnonzero(out)


NO_FILTERS = Filters()
