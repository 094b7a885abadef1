"""What the shop's backend imports: start runs (client, aclient) and the old Celery tasks (tasks)."""
