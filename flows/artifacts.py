"""Publishing Prefect artifacts (links, tables, markdown) from any stage; a no-op outside a flow run."""
from __future__ import annotations

import logging
import re

log = logging.getLogger(__name__)


def _key(name: str) -> str:
    # Prefect artifact keys: lowercase letters, numbers and dashes only.
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:100] or "artifact"


def _in_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def publish_table(key: str, rows: list[dict], description: str = "") -> None:
    if not _in_run():
        return
    from prefect.artifacts import create_table_artifact

    create_table_artifact(table=rows, key=_key(key), description=description)


def publish_markdown(key: str, markdown: str, description: str = "") -> None:
    if not _in_run():
        return
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(markdown=markdown, key=_key(key), description=description)


def publish_link(key: str, path: str, description: str = "") -> None:
    if not _in_run():
        return
    from prefect.artifacts import create_link_artifact

    link = path if "://" in path else f"file://{path}"
    create_link_artifact(link=link, link_text=path, key=_key(key), description=description)
