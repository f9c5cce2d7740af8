"""``python -m fastrp.sweep``: a grid of fastrp training runs on Ray, with results you can publish.

``python -m fastrp.sweep --sweep-dir DIR --grid KEY=V1,V2,... [--grid ...] [--set KEY=VALUE ...]``
runs every combination of the ``--grid`` values (any :class:`fastrp.config.Config` field; integer
fields take ranges, ``seed=0-4``), each with the ``--set`` values, as one trial. Every trial's
command line is resolved and validated by the trainer's own config code before anything starts.

* Trials are ordinary run directories ``DIR/<key=value,...>`` written by ``python -m
  fastrp.train`` itself (run by the trial's Ray worker in a child process), so
  ``python -m fastrp.train --resume``, ``python -m fastrp.plot`` and ``python -m
  fastrp.diagnostics`` accept them as they are.
* Ray Tune holds the trial state, the retries (``--max-retries``), the resources of a trial
  (``--cpus-per-trial``, also its ``--cpu-threads``; ``--gpus-per-trial``, fractions allowed) and
  the concurrency (``--max-concurrent``); ``--address`` joins a running cluster, otherwise the
  command starts and stops a local Ray instance. A retried trial continues from its own
  checkpoint. ``--resume DIR`` after the command was killed restores Tune's experiment and runs
  only the unfinished trials, again from their checkpoints.
* A live line on stderr: trials done / running / failed / pending, the best eval so far, ETA.
* At the end (and at any time with ``--summary DIR``): ``DIR/summary.csv`` with one row per group
  (every grid field but ``seed``): seeds, final and best eval return mean +- std, and the
  interquartile mean of the final eval return with a bootstrap 95 % confidence interval
  (:mod:`fastrp.sweep.summary`), and ``DIR/curves_<env>.png`` (mean +- std over seeds, drawn by
  :mod:`fastrp.plot`).

``DIR/.sweep/`` holds the sweep's own files: ``sweep.json`` (grid, settings, every trial's
trainer command), ``tune/`` (Ray Tune's experiment state), ``trials/<name>.json`` (status and
attempts of each trial), ``logs/<name>.log`` (the trainer's output) and ``locks/``.

Ray is an optional dependency (``pip install "fastrp[sweep]"``); ``--summary`` works without it.
"""
