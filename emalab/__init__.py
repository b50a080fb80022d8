"""emalab's application layer: the CLI, the main pipeline and the report. The library never imports it."""
