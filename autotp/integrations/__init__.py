"""What autotp knows of other libraries' models, in one place (the stages above ask it
and know nothing of transformers themselves).

hf.py       a transformers model: is it one, its decoder layers and vocabulary modules,
            its cache objects, the hooks it installs to collect outputs, its loss
hf_keys.py  transformers' checkpoint key conversions (legacy names in saved files)

Takes a model; gives facts about it.
"""
