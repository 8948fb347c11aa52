"""Deployable artifacts: ``slimkit.export.onnx`` (ONNX with int8 QDQ layers).

Nothing is imported here, so ``import slimkit`` never pulls in onnx or onnxruntime.
"""
