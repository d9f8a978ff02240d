"""Bytes in and out: the only code that reads tensor files or writes them.

- ``reader``: validates a safetensors header against the file's real size before
  anything reads it, then reads tensors lazily; refuses pickles unless asked, and then
  reads them only with ``torch.load(weights_only=True)``;
- ``writer``: temp file in the target folder, flush, read back, rename into place;
  never replaces an existing file unless told to;
- ``stream``: files written header first and copied tensor by tensor with overlapping
  read, transform and write, so a checkpoint never sits in memory whole.

It knows nothing of adapters, algorithms or models.
"""
