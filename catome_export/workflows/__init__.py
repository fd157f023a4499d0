"""Workflows: the glue that needs several layers at once (export + backends + runtime + analysis).

Layers depend downward only: ``merging`` < ``models`` < ``eager`` / ``analysis``
< ``export`` < ``backends`` < ``runtime`` < ``workflows`` < ``cli``.
``workflows.build`` builds an engine folder and verifies it with the runtime;
``workflows.eager`` is ``apply_catome`` with ``auto:K`` calibration;
``workflows.generate`` runs a pipeline (eager or on an engine) and saves
images; ``workflows.evaluate`` is the eval command's run.
Submodules are imported on use, so importing this package stays cheap.
"""
