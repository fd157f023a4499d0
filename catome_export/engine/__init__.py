"""The engine folder as a typed contract between the export and everything that reads engines.

``manifest`` (what was built, from what, for which shapes), ``options`` (the build options and their checks),
``specs``/``shapes``/``io_names``/``controlnet`` (the stages' IO, the built shape ranges, the IO names), and
``folder`` (lock, atomic install, foreign files). Nothing here imports the export, backends, runtime or
anything above them. Submodules are imported on use, so importing this package stays cheap.
"""
