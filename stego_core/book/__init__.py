"""The book tooling: everything between the stages' artifacts and the published Jupyter Book.

- ``parameters``: notebooks' ``parameters`` cells, ``-p`` values and profiles (``notebooks/profiles/*.yaml``);
- ``runner``: papermill runs of the jupytext notebooks into executed chapters, with a cache key;
- ``vendor``: the pinned npm JavaScript that makes the book work offline;
- ``build``: the Jupyter Book build (chapters not executed yet are left out);
- ``sphinx_ext``: the Sphinx extension ``_config.yml`` loads;
- ``cli``: the ``stego-study`` command;
- view side: ``viz`` (images and Altair charts), ``figures`` (the study's figures: ``figure_data`` and
  ``figure_charts``) and ``widgets`` (the segmentation explorer's chart and live panel).

Importing the package imports nothing heavy; each module imports what it needs.
"""
