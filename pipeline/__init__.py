"""streamdet pipeline: stages, messages, transport and sinks."""
