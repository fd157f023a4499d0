"""Export: stage cutting, ONNX export, manifest, TensorRT operator audit, engine builds.

Submodules are imported on use (``from catome_export.export.stages import cut_unet``),
so importing this package stays cheap.
"""
