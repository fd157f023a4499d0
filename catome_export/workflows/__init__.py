"""Workflows: the glue that needs several layers at once (export + backends + runtime + analysis).

Layers depend downward only: ``merging`` < ``models`` < ``eager`` / ``analysis``
< ``export`` < ``backends`` < ``runtime`` < ``workflows`` < ``cli``.
``workflows.build`` builds an engine folder and verifies it with the runtime;
``workflows.eager`` is ``apply_catome`` (the one; it calibrates ``auto:K`` schedules);
``workflows.generate`` runs a pipeline (eager or on an engine) and saves
images; ``workflows.evaluate`` is the eval command's run.
Submodules are imported on use, so importing this package stays cheap.
"""
