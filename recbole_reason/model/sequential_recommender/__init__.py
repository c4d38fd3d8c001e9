"""One file per plugin model; `recbole_reason.utils.get_model` finds class `X` in module `x`."""
