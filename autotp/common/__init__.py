"""Common to every stage (the lowest layer): what every other package may import.

errors.py        AutoTPError and the kinds the command line titles; each error's node,
                 module path and user source line, and its hint as data
tools.py         PyTorch's tools (CommDebugMode, global hooks, profilers) set aside while
                 autotp traces and plans, so they count only what the model runs
tensor_names.py  every name of each tensor (ties), and a value under all of them
hooks.py         a module's own hooks, named once, and the one scan of them

Takes nothing from autotp; gives the vocabulary of errors and names.
"""
