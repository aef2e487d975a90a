"""Operating a running pipeline: the control API, runtime source add/remove, health, the preview page.

Off unless ``control.port`` (``--control-port``) is set. :mod:`~pipeline.control.plane` is the
runner's side (commands run in the runner's thread), :mod:`~pipeline.control.app` the FastAPI
app, :mod:`~pipeline.control.server` uvicorn in a thread, :mod:`~pipeline.control.preview` the
latest preview frames and their viewers; the client is ``python -m pipeline.ctl``. See docs/control.md.
"""
