"""Workflows: the glue that needs several layers at once (export + backends + runtime + analysis).

Layers depend downward only: ``merging`` < ``models`` < ``eager`` / ``analysis``
< ``export`` < ``backends`` < ``runtime`` < ``workflows`` < ``cli``.
``workflows.build`` builds an engine folder and verifies it with the runtime.
Submodules are imported on use, so importing this package stays cheap.
"""
