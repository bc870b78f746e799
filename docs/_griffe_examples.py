"""A griffe extension for the API reference: read reflora's "Example:" sections as examples.

reflora's docstrings (Google style) head their doctest with "Example:". griffe
only treats the plural "Examples:" as an examples section (rendered as
code); the singular becomes a Markdown admonition, where ">>>" lines turn
into nested block quotes. This extension renames the header in the copy of
each docstring griffe renders; the source is not touched.
"""

from __future__ import annotations

import re

import griffe

_HEADER = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    def on_instance(self, *, node, obj, agent, **kwargs):  # noqa: ARG002 - griffe's signature
        doc = obj.docstring
        if doc is not None and "Example:" in doc.value:
            doc.value = _HEADER.sub(r"\1Examples:", doc.value)
