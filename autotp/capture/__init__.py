"""Stage 1, capture: an unmodified model as a torch.fx graph whose every node carries its
shape.

trace.py     fx symbolic tracing or, where it fails, torch.export with dynamic sizes;
             what tracing drops (hooks, no_grad, custom Functions, mode flags) kept or refused
annotate.py  each node's example value: the graph run once on fake tensors (a repeated call
             of equal shapes run once)
exported.py  what an exported graph holds for: its input shapes and export's guards
calls.py     a region's call taken apart for tracing (its call pattern), and the cache it
             sees meanwhile

Takes a module and example inputs (real, fake or on the meta device); gives a GraphModule
with node.meta["val"] and the user's source line on each node.
"""
