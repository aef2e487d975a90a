"""The pipeline's stages (decode, preprocess, engine, postprocess) and sinks, one process each.

Each module defines a stage class with keyword-only typed dependencies and a picklable spec that
builds it inside its own process; :mod:`pipeline.runner` wires them together.
"""
