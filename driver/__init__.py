"""The orchestration layer: the only package that imports Ray.

``cli`` (the ``r2ec`` command), ``loop`` (the training loop: ``train``, ``rl_step``), ``system`` (the Ray ``System``:
placement, workers, load balancing, fault recovery, weight-sync choreography), ``colocated`` (a learner rank and its
rollout engine in one process), ``run_state`` (the driver's checkpointed state), ``tracking`` (metrics sinks).
Below it: ``r2ec`` (the Ray-free library), ``rollout`` and ``learner`` (the plain worker classes).
"""
