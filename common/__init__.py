"""The shared library every service and the CLI build on: settings, records, the object store and
its keys, the Celery app, the review queue; it never imports a service."""
