"""The training loop's components, each deciding its own timing: one step (`step`), the step
report (`reporting`), checkpoints and the preemption save (`checkpointer`), the validation loss
(`validator`), samples and the end-of-run evaluation (`sampler`), and the engine they all drive
(`engine`). `sora_train.train` builds them and runs the loop."""
