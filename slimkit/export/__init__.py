"""Deployable artifacts: ``slimkit.export.onnx`` (ONNX with int8 QDQ layers) and ``slimkit.export.ort``
(running those files in ONNX Runtime).

Nothing is imported here, so ``import slimkit`` never pulls in onnx or onnxruntime.
"""
