"""Running over a Ray cluster (``--ray-address``): files as a batch of units, cameras as shards.

* :mod:`pipeline.cluster.worker`: what runs on a worker: a whole :class:`~pipeline.runner.Pipeline`
  for one file or one shard of cameras, its messages collected in order (no Ray import);
* :mod:`pipeline.cluster.relay`: the driver's side of the messages: every file's frames to the
  driver's sinks exactly once and in order, whatever retries happened (no Ray import);
* :mod:`pipeline.cluster.remote`: the Ray task (a file) and actor (a shard of cameras);
* :mod:`pipeline.cluster.driver`: connect, check, schedule, follow, retry, report.

Nothing here is imported, and Ray is not imported, unless ``cluster.ray_address`` is set. The
design and its measured costs are in docs/cluster.md.
"""
