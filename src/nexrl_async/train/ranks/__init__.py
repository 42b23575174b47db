"""Rank plumbing: where a process sits among the training ranks and how the ranks move together.

Owns: ``topology`` (world, process groups), ``collectives`` (reductions a step needs),
``commands`` (rank 0 broadcasts a command, every rank runs it and reports), ``follower`` (the
loop of every rank but 0), ``lockstep`` (ranks walking their share of a batch together),
``sharding`` (FSDP2), ``handle`` (rank 0's handle on the trainers of all ranks), ``remote``,
``remote_main``, ``remote_protocol`` and ``staging`` (a world-size-1 trainer in a child process,
its weights through shared memory).
Must not import: ``inference``, ``rollout``, ``weights``, ``engine``.
"""
