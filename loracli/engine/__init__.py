"""The batched engine: schedule -> run -> postprocess, one step at a time (see `engine.Engine`)."""
