"""What each stage will do, as pure rules `harness plan` shows and stage.json carries: the stages
of a plan and which share a launch, the DeepSpeed config of each, what trains, the fast path, how
each starts from the previous stage or resumes from its own checkpoint, which token stores it
reads, how much memory a rank needs. Decided on the launch side, carried out by the worker; no torch.

    stage.py      Stage, StageData, stage.json (StageFile), the engine identity of a stage
    expand.py     plan -> stages, with every rule that needs the resolved numbers
    groups.py     which consecutive stages share a launch
    ds_config.py  stage -> DeepSpeed config (ds_configs/ holds those of plans/)
    trainable.py  which parameters train, in which lr groups; params.py the model's parameter table
    fast.py       which parts of the fast path a stage turns on; micro_batch auto's candidates
    memory.py     the per-rank memory estimate of a stage, term by term
    fit.py        whether a stage fits a rank's memory; zero_stage/offload/checkpointing/micro_batch auto
    start.py      full_state or weights_only from the previous stage
    resume.py     how an interrupted stage continues from its own checkpoints
    stores.py     the token stores a stage reads and their keys
"""
from harness.stages.ds_config import get_train_ds_config
from harness.stages.expand import eval_size, expand_stages, stage_fields
from harness.stages.groups import launch_groups, launch_name
from harness.stages.stage import ModelShape, Stage, StageData, StageFile, engine_identity
from harness.stages.start import expected_start_digest, start_decision
from harness.stages.stores import required_stores, stage_stores

__all__ = ["ModelShape", "Stage", "StageData", "StageFile", "engine_identity", "eval_size", "expand_stages", "expected_start_digest", "get_train_ds_config",
           "launch_groups", "launch_name", "required_stores", "stage_fields", "stage_stores", "start_decision"]
