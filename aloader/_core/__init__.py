"""The async core, one module per stage in the order data flows (see ``pipeline.py`` for the drawing).

Run by the main process for every iterator, and by each worker process over the batches it is given.
"""
