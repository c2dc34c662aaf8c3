"""What every run (training, sampling, evaluation) stands on: the device mesh and multi-host start-up
(`parallel`), orbax checkpoints read and written on any topology (`checkpoint`, `restore`), the train
state with its optimizer and EMA (`state`), and config checks (`config_utils`).  The library may import
this package; only `train/` and `scripts/` import `train/`."""
