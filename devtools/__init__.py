"""Development helpers: demo data, a local SMTP sink, subprocess control, token test helpers.

Used by `python -m devtools up` / `seed`, the tests and the benchmarks; never by a flow.
aiosmtpd (the sink) is in the dev dependency group only.
"""
