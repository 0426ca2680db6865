"""Sphinx extension: drop duplicate <script> entries from each page.

sphinx-thebe registers its inline configuration script once per reading pass (with
``filename=None``), and the theme registers it again (with ``filename=""``), so every page
received ``const THEBE_JS_URL = ...`` twice: a JavaScript error ("already been declared")
in every reader's browser console. Keep the first of each identical script.
"""

from __future__ import annotations


def _dedup(app, pagename, templatename, context, doctree) -> None:
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, unique = set(), []
    for js in scripts:
        key = (str(getattr(js, "filename", js) or ""),
               repr(sorted(getattr(js, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            unique.append(js)
    context["script_files"] = unique


def setup(app):
    app.connect("html-page-context", _dedup, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
