"""Plugin data modules; `recbole_reason.utils.create_dataset` finds class `XDataset` in module `x_dataset`."""
