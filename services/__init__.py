"""The emc services: generator, judge, attribution and analysis (steps in ``steps.py``, thin
Celery tasks in ``tasks.py``) and the review UI (a Flask app); ``common.cli`` composes them."""
