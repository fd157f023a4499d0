"""Serving an engine on Ray Serve: ``catome-export serve`` and :func:`catome_export.serve.deployment.build_app`.

- :mod:`~catome_export.serve.protocol`: the HTTP protocol (OpenAI's images API), request validation (no Ray).
- :mod:`~catome_export.serve.service`: one replica's engine, pipeline, batching and health (no Ray).
- :mod:`~catome_export.serve.deployment`: the Ray Serve deployment and the application builder (needs ray[serve]).
- :mod:`~catome_export.serve.local`: starting a local Ray / joining a cluster, starting and stopping the app.
- :mod:`~catome_export.serve.loadtest`: load and reliability checks against 127.0.0.1.

See docs/serving.md.
"""
