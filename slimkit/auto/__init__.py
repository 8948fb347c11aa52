"""Automatic compression: ``advise`` (which technique, for this model on this machine, by measurement).

Sits above ``recipe`` (it builds and runs steps, and writes recipes) and below ``api``/``cli``.
"""
