"""The report's presentation layer: pure functions from numbers and arrays to HTML text and PNG figures.

`summary` reads the evaluation summary (which methods are models and which combine them, the
per-image gains), `page` writes the HTML (style, skeleton, tables, sections, number formatting)
and `figures` draws the PNGs with matplotlib (gain chart, LUT weight maps, crop panels). Nothing
here opens a store: `ensir_flow.pipelines.report` reads the stores and the LUT and assembles the
page from these pieces.
"""
