"""The ``emc`` command line: the one composition root, the only place that names services.

:mod:`.main` builds the typer app from every service's ``register``; :mod:`.system` (doctor,
up, worker), :mod:`.pipeline` (mine, status, reindex), :mod:`.demo` and :mod:`.organism`
are the commands of the shared library.
"""
