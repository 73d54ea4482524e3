"""Size limits on untrusted input (uploads and zip archives), for a local run or a hosted demo.

Every uploaded file is untrusted: :mod:`geometry.io.loader` checks these numbers itself, whatever
the web server already enforced (``.streamlit/config.toml`` ``server.maxUploadSize`` is a first
gate only; Streamlit's number is per file, in MiB, and cannot see inside a zip).

Normal (a local run, the CLI)::

    max_upload_bytes = 1 GiB    # = server.maxUploadSize = 1024 (MiB) in .streamlit/config.toml; the
                                # largest common LoRA uploads (rank 64-256 on 7-13B bases, or every
                                # linear layer of a 70B base at rank 16) are a few hundred MB
    max_zip_bytes    = 2 GiB    # uncompressed total of one zip: a 1 GiB upload of fp16/bf16 weights
                                # (which barely compress) plus room; far below the RAM of a laptop
    max_zip_members  = 10,000   # a training run folder with checkpoint-N/ copies, logs and
                                # tokenizer files has hundreds; 10,000 keeps the zip directory small
    max_ratio        = 200      # real weights compress ~1.1:1 (even an untrained adapter with an
                                # all-zero lora_B stays under 3:1 per file); zeros deflate ~1000:1
                                # and bzip2 far more, so > 200:1 on a member over 1 MiB is a bomb

Demo (``ADAPTER_ATLAS_DEMO=1``, a page shared with strangers on one small machine)::

    max_upload_bytes = 200 MiB  # per upload, and
    max_zip_bytes    = 200 MiB  # per zip uncompressed: a few people loading at once must fit in
                                # memory (the loader holds the bytes and then the tensors)
    max_zip_members  = 1,000    # an adapter zip has 2-10 members; 1,000 allows a small run folder
    max_ratio        = 200      # as above

The ratio is only checked for members larger than :data:`RATIO_MIN_BYTES` (1 MiB): a small
``adapter_config.json`` full of spaces may legitimately compress very well, and cannot be a bomb.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

#: Environment variable that turns on the demo limits ("1", "true", "yes" or "on").
DEMO_ENV = "ADAPTER_ATLAS_DEMO"
#: Members smaller than this are never refused for their compression ratio.
RATIO_MIN_BYTES = 1024**2


@dataclass(frozen=True)
class Limits:
    """Caps on one untrusted upload (see the module docstring for why each number)."""

    #: Largest upload (a zip, a config or a weights file) read into memory, in bytes.
    max_upload_bytes: int
    #: Largest total uncompressed size of the members of one zip, in bytes.
    max_zip_bytes: int
    #: Most members (files and folders) in one zip.
    max_zip_members: int
    #: Largest uncompressed / compressed ratio of a zip member over ``RATIO_MIN_BYTES``.
    max_ratio: float


NORMAL = Limits(max_upload_bytes=1024**3, max_zip_bytes=2 * 1024**3, max_zip_members=10_000, max_ratio=200.0)
DEMO = Limits(max_upload_bytes=200 * 1024**2, max_zip_bytes=200 * 1024**2, max_zip_members=1_000, max_ratio=200.0)


def is_demo() -> bool:
    """Whether ``ADAPTER_ATLAS_DEMO`` asks for the demo limits ("1" / "true" / "yes" / "on")."""
    return os.environ.get(DEMO_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def limits(demo: bool | None = None) -> Limits:
    """The limits in force: the demo ones if ``demo`` (``None``: read ``ADAPTER_ATLAS_DEMO``)."""
    if demo is None:
        demo = is_demo()
    return DEMO if demo else NORMAL
