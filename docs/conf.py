"""Sphinx configuration of ensir-flow's documentation (Markdown pages through MyST; the CLI and API
references generated from the click commands and the docstrings of `ensir_flow.api`).

Build: `sphinx-build -W --keep-going -b html docs docs/_build/html` (warnings are errors)."""

import ensir_flow

project = "ensir-flow"
author = "ensir-flow contributors"
copyright = "ensir-flow contributors"
release = version = ensir_flow.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx_click",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# The docstrings are prose in which `name` means code, as in the Markdown pages.
default_role = "literal"

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
napoleon_google_docstring = False
napoleon_numpy_docstring = True

html_theme = "pydata_sphinx_theme"
html_title = f"ensir-flow {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
}
html_show_sourcelink = False


def _run_options_as_definition_list(app, what, name, obj, options, lines):
    """`RunOptions`' docstring lists its keys as `key: text` lines with indented continuations,
    which reST reads as broken definition lists (warnings, so errors here): give each key its own
    line and indent its text, a definition list proper. The docstring stays as it reads in code."""
    if name != "ensir_flow.api.RunOptions":
        return
    rewritten = []
    for line in lines:
        key, colon, text = line.partition(": ")
        if colon and key.isidentifier() and not line.startswith(" "):
            rewritten += [f"``{key}``", f"    {text}"]
        elif line.startswith("    ") and rewritten and rewritten[-1].startswith("    "):
            rewritten.append(f"    {line.strip()}")
        else:
            rewritten.append(line)
    lines[:] = rewritten


def setup(app):
    from pygments.lexers.shell import BashLexer

    app.connect("autodoc-process-docstring", _run_options_as_definition_list)
    app.add_lexer("cron", BashLexer)  # crontab lines are shell commands after their five time fields
