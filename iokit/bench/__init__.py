"""iokit.bench: what each I/O model costs on this machine, next to the best outside references, measured the same way
in the same run. Run it as ``python -m iokit.bench [--quick]`` (see ``__main__.py`` and docs/benchmarks.md).

Layout, one concern per module:

* ``__main__``: the command line; ``context``: settings (quick/full) and what each workload family is handed.
* ``machine``: the machine description printed with every run, and the core plan (measured process vs load).
* ``processes``: child processes pinned to their cores and measured (CPU, context switches, peak RSS).
* ``cbuild`` + ``csrc/``: the C load generator and the C echo servers, compiled on the fly into a cache.
* Workload families: ``file_io`` (+ ``file_worker``, ``fio``), ``echo`` (+ ``loadgen``, ``servers``,
  ``echo_server``, ``asyncio_echo``), ``http_load`` (+ ``wrk_report.lua``), ``patterns`` (``waiting_clients``,
  ``uploads``, ``updates``).
* Output: ``results`` (rows and JSON), ``report`` (the table), ``plots`` (PNGs; ``python -m iokit.bench.plots
  RUN.json OUT.png`` redraws a saved run), ``progress`` (the live line).
"""
