"""MkDocs hooks: pages whose content is generated from the code at build time, so they cannot
drift from it (`mkdocs.yml` names this file under `hooks:`)."""

from __future__ import annotations

from typing import Any

MARKER = "<!-- config-reference -->"


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    """The configuration page's marker becomes the reference that `qatkd --help` prints too."""
    if MARKER not in markdown:
        return markdown
    from qatkd.reference import markdown as reference

    return markdown.replace(MARKER, reference())
