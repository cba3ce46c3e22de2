"""Scale-out: what a run needs beyond one small GPU, kept apart from the chapter modules a learner reads.

    mpi.scale.memory        expected peak GPU memory per stage, the preflight that refuses a stage that cannot
                            fit (`python -m mpi.scale.memory --preset colab-t4 --gpu t4`)
    mpi.scale.distributed   data-parallel helpers for `accelerate launch` (sharding, gradient all-reduce)

The course runs without either on one device: the pipeline calls the preflight before each training stage,
and the distributed helpers are no-ops in a single process.
"""
