"""Small Sphinx fixes for the RL-MedBook HTML (listed in _config.yml ``extra_extensions``).

* sphinx-thebe adds its inline config script twice under Jupyter Book 1.x, which throws
  "Identifier 'THEBE_JS_URL' has already been declared" on every page: keep one copy of each script.
* pydata-sphinx-theme logs "Got invalid theme mode" when its ``default_mode`` context is empty:
  default to ``light``.
"""
from __future__ import annotations


def _fix_page(app, pagename, templatename, context, doctree):
    scripts = context.get("script_files") or []
    seen, unique = set(), []
    for js in scripts:
        attrs = tuple(sorted((getattr(js, "attributes", None) or {}).items()))
        key = (str(getattr(js, "filename", js) or ""), attrs)
        if key not in seen:
            seen.add(key)
            unique.append(js)
    scripts[:] = unique
    if not context.get("default_mode"):
        context["default_mode"] = "light"


def setup(app):
    app.connect("html-page-context", _fix_page, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
