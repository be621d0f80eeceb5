"""The Celery side: app, routing, tasks, signal handlers and generators.

Start a worker with ``celery -A tasks.celery_app:celery_app worker -Q sdxl``.
"""
