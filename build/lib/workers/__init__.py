"""The Celery worker deployable: ``celery -A workers.app worker`` (see :mod:`workers.app`)."""
