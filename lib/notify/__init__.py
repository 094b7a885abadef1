"""Notifications: addresses, templates, the email and SMS channels, and the delivery log.

Pure functions and plain classes only (no prefect): flows/notifications.py wraps each
side effect (one SMTP session, one httpx client pass, one transaction) in a task.
"""
