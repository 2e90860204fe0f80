"""The host implementation of the `pie:inferlet` WIT: one plain-Python module per interface.

Every function takes the calling instance's `InstanceHost` first and plain values after; both
the wasm glue (`runtime/wasm_bindings.py`) and native mode (`runtime/native.py`) call these same
functions, so the two modes cannot drift. Errors a guest can handle are raised as `HostError`
(or a control/engine error) and become WIT `err` values; `InstanceTrap` ends the instance.
"""
