"""gfspy's distributed lock manager: VMS/Linux DLM semantics over TCP, in trio.

Layers, each in its own module: `modes` (constants and argument rules), `engine` (the
pure per-resource grant engine), `messages` (wire codecs), `transport` (reliable
per-peer links), `directory` (who records each resource's master), `lockspace` (the
node's lock agent and its API) and `recovery` (what `Lockspace.start(view)` runs after
a membership change).
"""
