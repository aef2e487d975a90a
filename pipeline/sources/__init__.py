"""Video sources of the decode stage: options, probing, hardware decode, file and live readers.

These modules hold everything about reading a source that is not the decode stage's process
plumbing (:mod:`pipeline.stages.decode`), so that :mod:`pipeline.settings` can import the option
classes (:mod:`pipeline.sources.options`) without the stage, PyAV or the transport.
"""
