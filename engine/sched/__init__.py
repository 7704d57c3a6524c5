"""The scheduler's parts (engine/scheduler.py runs them as one step machine: admit -> launch -> handle).

    events.py     the live-trajectory record, the typed events jobs post, the engine's inbox
    jobs.py       the jobs: a generation, a turn's tools, an environment step (each posts one event)
    admission.py  the one admission rule (capacity, staleness bound, the launch policy's gate)
    launch.py     launch policies: continuous (the engine) and lock-step (the TRL-style baseline)
    placement.py  servers: ready queues, slots in flight, affinity, failover
    limits.py     limits that end a trajectory: deadlines, turns, context, repetition, the cascade
    observe.py    tool results -> one observation (image budget, names, notes), observation hooks
    gcpolicy.py   the garbage-collector policy around a run (a context manager)
    tokencheck.py the token-in/token-out check of a finished trajectory

Tests: `.venv/bin/python -m pytest -q tests/test_scheduler_parts.py tests/test_scheduler.py`.
"""
