"""Griffe extension: read a Google-style ``Example:`` section as ``Examples:``.

The house style titles the section ``Example:``; griffe's Google parser renders
only ``Examples:`` as code (``>>>`` lines), and any other title as Markdown text,
where ``x[-1]`` reads as a link. Renaming the title before parsing renders every
example as code.
"""

import re

import griffe

_TITLE = re.compile(r"^(\s*)Example:\s*$", re.M)


class ExampleSections(griffe.Extension):
    """Renames ``Example:`` section titles to ``Examples:`` in every docstring."""

    def on_object(self, *, obj, loader, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _TITLE.sub(r"\1Examples:", obj.docstring.value)
