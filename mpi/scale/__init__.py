"""Scale-out: what a run needs beyond one small GPU, kept apart from the chapter modules a learner reads.

    mpi.scale.memory        expected peak GPU memory per stage, the preflight that refuses a stage that cannot
                            fit (`python -m mpi.scale.memory --preset colab-t4 --gpu t4`)
    mpi.scale.poro_trl      the same PolicyRollout step on TRL's GRPOTrainer (the speed benchmark's reference)

The data-parallel helpers the training loops call are `mpi.distributed` (a lower floor: no-ops in one
process). The pipeline calls the preflight before each training stage.
"""
