"""Errors that name what is wrong: the site, the case and the field."""
from typing import Optional


class FederationError(RuntimeError):
    """Bad federation input (sites.json, dataset.json, images) or a disagreement between sites.

    The message always says which site, which case and which field, where they are known, so
    that a hospital's IT can find the file at fault without reading a traceback.
    """

    def __init__(self, message: str, site: Optional[str] = None, case: Optional[str] = None,
                 field: Optional[str] = None):
        self.site, self.case, self.field = site, case, field
        where = []
        if site is not None:
            where.append(f"site '{site}'")
        if case is not None:
            where.append(f"case '{case}'")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__((', '.join(where) + ': ' if where else '') + message)
