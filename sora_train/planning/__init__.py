"""Planning a run before launching it: memory and FLOPs per GPU (`sora-plan`)."""
